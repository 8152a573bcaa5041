"""Part `probe`: olaf's one pass (every task, every layer, one MLLM forward per step) against the authors' one job per
task with the teacher online per image."""

from __future__ import annotations

import torch

from benchmarks import vlora_step
from benchmarks.gpu_proof.part_pt import config
from benchmarks.gpu_proof.runner import Proof, fits, ratio
from benchmarks.gpu_proof.setup import Setup, frozen_models, in_step_targets, jpegs, teacher_models
from benchmarks.timing import median_seconds
from recipes.manifest import TASKS


def part_probe(proof: Proof, s: Setup) -> None:
    """olaf's one pass against the authors' one job per task, on the same frozen MLLM, a few steps each."""
    proof.check("building the MLLM")
    tok, llm, tower, _, _ = frozen_models(s)
    llm.eval()  # PT's part may have left it training (its checkpointing switch)
    teachers = teacher_models(s)
    shapes = {t: tuple(teacher.spec.output_shape) for t, teacher in teachers.items()}  # what the probes predict
    probed = random_probed(s, tok, llm, tower)
    rows = {"olaf: one pass, every task": probe_row(s, probed, shapes, list(TASKS))}
    proof.put("designs", rows)
    for t in TASKS:
        proof.check(f"the authors' job '{t}'")
        rows[f"authors: job '{t}', teacher online"] = probe_row(s, probed, shapes, [t], {t: teachers[t]})
        proof.put("designs", rows)
    jobs = [r for k, r in rows.items() if k.startswith("authors")]
    one = rows["olaf: one pass, every task"]
    total = sum(r["ms_per_sample"] for r in jobs) if all("ms_per_sample" in r for r in jobs) else None
    proof.put("authors_total_ms_per_sample", round(total, 2) if total else None)
    proof.put("one_pass_vs_jobs", ratio(total, one.get("ms_per_sample")))


def random_probed(s: Setup, tok, llm, tower):
    """A probed model of random weights: the LLM and tower, an mlp2x_gelu projector and task tokens."""
    from trainer.data import ImageRecipe
    from trainer.formats.common import Probed
    from trainer.sequence import Projector, TaskTokens
    from trainer.towers import OPENAI_MEAN, OPENAI_STD

    cfg = config([])
    tokens = TaskTokens.random(cfg.tasks.special_tokens, cfg.tasks.task_tokens,
                               llm.config.hidden_size).requires_grad_(False)
    image = ImageRecipe(336, 336, "bicubic", OPENAI_MEAN, OPENAI_STD)  # CLIP-L/336's processor
    proj = Projector(tower.hidden_size, llm.config.hidden_size)
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj.to(s.device, s.dtype),
                  tokens.to(s.device, s.dtype), tok, "llama_3", image, "random weights")


def probe_row(s: Setup, probed, shapes: dict, tasks: list[str], teachers: dict | None = None) -> dict:
    from trainer.build import trainable
    from trainer.loop import train_step
    from trainer.probe import PROBE_DEFAULTS, ProbeSet

    cfg = config([PROBE_DEFAULTS])
    mllm = probed.mllm()
    layers = list(range(1, mllm.config.num_hidden_layers + 1))
    probes = ProbeSet(mllm, {t: shapes[t] for t in tasks}, layers, cfg.tasks.predictor).to(s.device)
    run = trainable(cfg, probes, s.device, s.dtype, total_steps=1000)
    batch = vlora_step.batch_for(mllm.layout, s.probe_batch, 32, shapes, tasks, s.device)
    raw = jpegs(s.probe_batch) if teachers else None
    steps = []

    def step():
        if teachers:  # the authors' probe job: its task's teacher per image, inside each step
            with torch.no_grad():
                batch["targets"] = in_step_targets(teachers, raw, s)
        train_step(run, [batch])
        steps.append(1)

    row = {"batch": s.probe_batch, "probes": len(probes.probes),
           "probe_params": sum(p.numel() for p in probes.parameters() if p.requires_grad)}
    s.reset_memory()
    before = probes.forwards
    secs = fits(lambda: median_seconds(step, s.device, min_calls=s.steps))
    if secs is None:
        return {**row, "out_of_memory": True}
    return {**row, "ms_per_sample": round(1e3 * secs / s.probe_batch, 2), "peak_mem_gib": s.peak_memory_gib(),
            "mllm_forwards_per_step": (probes.forwards - before) / len(steps)}

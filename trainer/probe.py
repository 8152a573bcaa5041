"""Probing an MLLM from stored targets (OLA-VLM, Sec. 3 and docs/Probing.md): a single-block Perceiver resampler
probe at every LLM layer, for every task of the store, trained together from one forward of the frozen MLLM per
batch; no teacher is ever loaded.

    python -m trainer.probe --store TRAIN_STORE --eval-store VAL_STORE --model MODEL --output-dir OUT \\
        [--vision-tower T --mm-projector mm_projector.bin] [--layers 1-32] [--tasks gen,depth,seg] [--resume]
    torchrun --nproc_per_node 8 -m trainer.probe ...     # DDP, as trainer.pt
    python -m trainer.probe plot OUT [OUT2 ...] [--out probes.png]   # cosine vs layer, runs overlaid

MODEL is one of:
  (a) an olaf PT run's export/ folder (trainer.pt): its LLM, base encoder, projector and task tokens;
  (b) an LLM (HF id or folder) with --vision-tower and --mm-projector (LLaVA's mm_projector.bin);
  (c) a transformers LlavaForConditionalGeneration folder or id (e.g. llava-hf/llava-1.5-7b-hf).
The probe is the original's probe head (a Resampler with learnable latents: 576 for depth and seg, 1 for gen,
inner width = the target's width, 4 heads x 32, ff mult 1), its keys every token of its layer's hidden states
(padding masked). Loss: smooth-L1 (beta 1). Defaults are the paper's (trainer/configs/probe.yaml: lr 1e-3,
batch 256, 2 epochs, cosine with 3% warm-up). The prompt is each record's question (from-images writes the
paper's "Describe the image in two lines."), and no answer.

Outputs in OUT: probe_scores.json and .csv (mean cosine similarity between each probe's flattened output and the
target, per (task, layer), over the eval store's valid samples), probe_plot.png, probes/<task>_<layer>
.safetensors, and trainer.pt's logs/ and checkpoints/ (--resume continues, on any number of processes).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from recipes.manifest import PROBE_EVAL_MANIFEST, PROBE_MANIFEST, ordered_tasks
from store import Location, Store, read_manifest, refuse_inside_store, weights_mismatches
from trainer.build import assemble, open_store
from trainer.config import PTConfig, load_config
from trainer.data import ImageRecipe, PTSample, collate
from trainer.errors import TrainerError
from trainer.formats import read as read_model
from trainer.heads import Predictor
from trainer.loop import run_cli, start, teardown, to_device, train
from trainer.loss import masked_smooth_l1
from trainer.sequence import MLLM, Layout
from trainer.templates import PromptBuilder

PROBE_DEFAULTS = Path(__file__).parent / "configs" / "probe.yaml"


class ProbeSet(nn.Module):
    """Every (task, layer) probe over one frozen MLLM (trainer.sequence.MLLM). `forward(batch)` -> (sum of the
    probes' smooth-L1, terms): one MLLM forward, under no_grad, then each probe on its layer (float32), each its
    own loss term. A probe is the predictor with learned latents (trainer.heads.Predictor)."""

    def __init__(self, mllm: MLLM, target_shapes: dict[str, tuple[int, int]], layers: list[int], head: dict):
        super().__init__()
        self.mllm = mllm.requires_grad_(False)
        self.layers, self.tasks = list(layers), ordered_tasks(target_shapes)
        width = mllm.config.hidden_size
        self.probes = nn.ModuleDict({
            f"{t}_{layer}": Predictor(width, target_shapes[t][1], head["heads"], head["dim_head"], head["ff_mult"],
                                      head["depth"], learned_latents=target_shapes[t][0])
            for t in self.tasks for layer in self.layers})
        self.forwards = 0  # MLLM forwards, whatever the number of probes

    @property
    def layout(self) -> Layout:
        return self.mllm.layout

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def step_context(self, micro_batches):
        return None

    def predict(self, batch: dict, mllm: MLLM | None = None) -> dict[str, dict[int, torch.Tensor]]:
        """Every probe's prediction from one forward of `mllm` (default: the one the probes train on)."""
        mllm = mllm or self.mllm
        self.forwards += 1
        with torch.no_grad():
            hidden, _ = mllm.run(batch)
        out = {}
        for t in self.tasks:
            out[t] = {}
            for layer in self.layers:
                keys, mask = mllm.layout.keys(hidden[layer].float(), batch["text_mask"])
                out[t][layer] = self.probes[f"{t}_{layer}"](keys, mask)
        return out

    def forward(self, batch: dict, context=None):
        preds = self.predict(batch)
        terms, total = {}, 0.0
        for t, by_layer in preds.items():
            for layer, p in by_layer.items():
                sl1 = masked_smooth_l1(p, batch["targets"][t], batch["valid"][t])
                terms[f"{t}/{layer}/sl1"] = sl1.detach()
                total = total + sl1
        terms["loss"] = total.detach()
        return total, terms


# ---- the probed model, in the forms users hold it ---------------------------------------------------------------


@dataclass
class ProbeRun:
    """A probing run's parts: the run (trainer.build.PTRun, its model the ProbeSet) and what evaluation uses: the
    MLLM (without task tokens unless `probe_task_tokens: keep`), the prompt (no answer) and the image recipe
    (first resized to `probe_eval_resize`), as the authors' eval_probe_dsg.py."""

    run: object
    eval_mllm: MLLM
    eval_builder: PromptBuilder
    eval_image: ImageRecipe
    what: str
    expected: dict


def build_probe(cfg: PTConfig, model: str, mm_projector: str | None, layers: list[int] | None, device, dtype,
                rank: int, world: int) -> ProbeRun:
    import dataclasses

    store, expected = open_store(cfg)
    target_shapes = {t: tuple(store.manifest.tasks[t].shape) for t in cfg.tasks.names}
    torch.manual_seed(cfg.optim.seed)
    probed = read_model(cfg, model, mm_projector, dtype)
    mllm = probed.mllm()
    n_layers = mllm.config.num_hidden_layers
    layers = layers or list(range(1, n_layers + 1))
    bad = [x for x in layers if not 1 <= x <= n_layers]
    if bad:
        raise TrainerError(f"--layers {bad}: the LLM has layers 1..{n_layers}")
    probes = ProbeSet(mllm, target_shapes, layers, cfg.tasks.predictor).to(device)
    answer = None if cfg.probe.answer == "record" else cfg.probe.answer
    builder = probed.builder(cfg.model.max_length, mllm.layout, answer=answer)
    run = assemble(cfg, device, dtype, store, probed.tokenizer, probes, builder, probed.image, rank, world,
                   "sdpa")
    eval_mllm = probed.mllm(with_task_tokens=cfg.probe.task_tokens == "keep").to(device)
    eval_builder = probed.builder(cfg.model.max_length, eval_mllm.layout, with_answer=False)
    eval_image = dataclasses.replace(probed.image, pre_resize=cfg.probe.eval_resize)
    return ProbeRun(run, eval_mllm, eval_builder, eval_image, probed.what, expected)


# ---- evaluation -------------------------------------------------------------------------------------------------

def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: the cosine similarity of the flattened prediction and target (the original's
    1 - CosineEmbeddingLoss on reshape(1, -1))."""
    return F.cosine_similarity(pred.float().flatten(1), target.float().flatten(1), dim=1)


@torch.no_grad()
def evaluate(probes: ProbeSet, eval_store: Store, pr: ProbeRun, pad_id: int, batch_size: int, device):
    """{task: {layer: mean cosine}} and {task: samples} over every valid sample of the eval store's done shards,
    with the evaluation's MLLM, prompt and image recipe (ProbeRun)."""
    tasks = probes.tasks
    sample = PTSample(pr.eval_builder, pr.eval_image, tasks, eval_store.manifest.tasks)
    sums = {t: {layer: 0.0 for layer in probes.layers} for t in tasks}
    counts = dict.fromkeys(tasks, 0)
    bad = set().union(*(eval_store.records[i].bad_indices() for i in eval_store.done_shards(tasks)))
    rows: list[dict] = []

    def flush():
        if not rows:
            return
        b = to_device({**collate(rows, pad_id), "positions": (0, len(rows)), "step": 0, "row_offset": 0}, device)
        preds = probes.predict(b, pr.eval_mllm)
        for t in tasks:
            keep = b["valid"][t]
            counts[t] += int(keep.sum())
            for layer, p in preds[t].items():
                sums[t][layer] += float(cosine(p, b["targets"][t])[keep].sum())
        rows.clear()

    for shard in eval_store.done_shards(tasks):
        for s in eval_store.iter_decoded(shard, tasks, compact=True):
            if s["index"] in bad:
                continue
            rows.append(sample({**s, "position": s["index"]}))
            if len(rows) == batch_size:
                flush()
    flush()
    scores = {t: {layer: sums[t][layer] / counts[t] if counts[t] else math.nan for layer in probes.layers} for t in tasks}
    return scores, counts


def protocol(cfg: PTConfig, pr: ProbeRun) -> dict:
    """How the scores were made, beside them: what the probes read at training and at evaluation."""
    return {"train_answer": cfg.probe.answer, "eval_answer": None, "eval_resize": cfg.probe.eval_resize,
            "eval_task_tokens": list(pr.eval_mllm.layout.task_slots), "image_aspect": pr.eval_image.aspect,
            "teachers_manifest": cfg.tasks.teachers_manifest}


def write_scores(out: Path, scores: dict, counts: dict, info: dict) -> None:
    (out / "probe_scores.json").write_text(json.dumps({**info, "samples": counts,
                                                       "scores": {t: {str(k): v for k, v in s.items()}
                                                                  for t, s in scores.items()}}, indent=1))
    with open(out / "probe_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "layer", "cosine", "samples"])
        for t, by_layer in scores.items():
            for layer, v in by_layer.items():
                w.writerow([t, layer, f"{v:.6f}", counts[t]])


def plot(runs: list[Path], out: Path) -> Path:
    """Cosine similarity vs layer, one line per (run, task): the paper's Fig. 3."""
    from PIL import Image, ImageDraw

    from trainer.plot import _panel

    series = {}
    for run in runs:
        data = json.loads((run / "probe_scores.json").read_text())
        for t, by_layer in data["scores"].items():
            label = f"{run.name}/{t}" if len(runs) > 1 else t
            series[label] = sorted((int(k), v) for k, v in by_layer.items() if v == v)
    img = Image.new("RGB", (1000, 420), (255, 255, 255))
    _panel(ImageDraw.Draw(img), (0, 0, 1000, 420), series, "probe: cosine similarity to the target, per LLM layer",
           xlabel="layer")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


# ---- the command ------------------------------------------------------------------------------------------------

def parse_layers(text: str | None) -> list[int] | None:
    """'1-32', '8,12,20' or '1-4,20' -> sorted unique layers; None = every layer. ValueError says what is wrong."""
    if not text:
        return None
    out = set()
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise ValueError(f"--layers {text!r}: {part.strip()!r} is not a layer number or a range like 1-32")
        lo, hi = int(a), int(b or a)
        if lo > hi:
            raise ValueError(f"--layers {text!r}: the range {part.strip()} runs backwards (write {hi}-{lo})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m trainer.probe", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="the training store (e.g. COCO train2017, extracted by olaf)")
    p.add_argument("--eval-store", required=True, help="the evaluation store (e.g. COCO val2017)")
    p.add_argument("--model", required=True, help="the MLLM to probe: a PT export folder, a folder or Hub id in the "
                                                  "authors' format (ola_llama, llava_llama, ...), a "
                                                  "LlavaForConditionalGeneration, or an LLM (with --vision-tower and "
                                                  "--mm-projector)")
    p.add_argument("--vision-tower", help="the base encoder (required for an LLM MODEL; default: the model's)")
    p.add_argument("--mm-projector", help="LLaVA's mm_projector.bin, for an LLM MODEL")
    p.add_argument("--chat-template", help="llama_3, phi_3 or vicuna_v1 (default: the model's; vicuna_v1 for llava-hf)")
    p.add_argument("--image-aspect", choices=["model", "square", "pad"],
                   help="default model: its config's image_aspect_ratio (their IFT models: pad)")
    p.add_argument("--task-tokens", choices=["keep", "drop"],
                   help="evaluate with the model's task tokens in the sequence or without them (default drop: the "
                        "authors' probe_mode; probes always train with them, as theirs)")
    p.add_argument("--eval-resize", type=int, metavar="N",
                   help="resize evaluation images to N x N first, for the MLLM (default 640, theirs; 0: no resize). "
                        "The eval store's teachers do the same through --eval-teachers-manifest")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--layers", help="layers to probe, e.g. 1-32 or 8,12,20 (default: every layer)")
    p.add_argument("--tasks", help="comma list (default: every task of the store)")
    p.add_argument("--teachers-manifest", help="teacher manifest the training store must match (default: "
                                               "ola_vlm_probe.yaml, the authors' probing targets)")
    p.add_argument("--eval-teachers-manifest", help="the eval store's (default: ola_vlm_probe_eval.yaml, or "
                                                    "--teachers-manifest when that is given)")
    p.add_argument("--config", action="append", default=[], help="YAML overriding the defaults (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    try:
        a.layers = parse_layers(a.layers)
    except ValueError as e:
        p.error(str(e))
    # the store's tasks from its manifest alone (the records are read once, when the run is built)
    tasks = a.tasks or ",".join(ordered_tasks(read_manifest(Location(a.store)).tasks))
    a.eval_teachers_manifest = a.eval_teachers_manifest or a.teachers_manifest or str(PROBE_EVAL_MANIFEST)
    sets = [*a.set, *(["probe_eval_resize=null"] if a.eval_resize == 0 else [])]
    try:
        cfg = load_config([PROBE_DEFAULTS, *a.config], {
            "store": a.store, "output_dir": a.output_dir, "vision_tower": a.vision_tower,
            "chat_template": a.chat_template, "teachers_manifest": a.teachers_manifest or str(PROBE_MANIFEST),
            "max_steps": a.max_steps, "resume": a.resume or None, "tasks": tasks, "llm": a.model,
            "image_aspect": a.image_aspect, "probe_task_tokens": a.task_tokens,
            "probe_eval_resize": a.eval_resize or None}, sets)
    except (ValueError, OSError) as e:
        p.error(str(e))
    return a, cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="python -m trainer.probe plot")
        p.add_argument("runs", nargs="+", type=Path)
        p.add_argument("--out", type=Path)
        a = p.parse_args(argv[1:])
        refuse_inside_store(a.out or a.runs[0], "--out")
        print(f"wrote {plot(a.runs, a.out or a.runs[0] / 'probe_plot.png')}")
        return 0
    a, cfg = parse_args(argv)
    if not cfg.tasks.names:  # before any model loads: nothing to probe for
        raise TrainerError(f"{cfg.data.store} holds no teacher target (a store of images, captions and ids, made with "
                           f"--tasks none): probes learn targets; add the teachers to it (python -m "
                           f"pipeline.extract_teachers ... --output {cfg.data.store} --tasks gen,depth,seg), or probe a "
                           f"store that has them")
    rank, world, device, dtype, log = start(cfg)
    out = Path(cfg.run.output_dir)
    eval_store, eval_expected = open_store(cfg, a.eval_store, a.eval_teachers_manifest)  # before any model loads
    pr = build_probe(cfg, a.model, a.mm_projector, a.layers, device, dtype, rank, world)
    other = weights_mismatches(pr.expected, eval_expected, cfg.tasks.names)
    if other:
        raise TrainerError("the training and eval stores' manifests name other teacher weights (probes would be "
                           "scored against other teachers' targets): " + "; ".join(other))
    run, probes = pr.run, pr.run.model
    log(f"probing {pr.what}: {len(probes.layers)} layers x {len(probes.tasks)} tasks = {len(probes.probes)} probes "
        f"({sum(p.numel() for p in run.trainable):,} parameters); {run.stream.num_samples:,} training samples, "
        f"{run.total_steps} steps of {cfg.optim.global_batch_size}")
    step = train(run, out, rank, world, log)
    if rank == 0:
        from safetensors.torch import save_file

        (out / "probes").mkdir(parents=True, exist_ok=True)
        for name, probe in probes.probes.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()},
                      out / "probes" / f"{name}.safetensors")
        probes.eval()
        scores, counts = evaluate(probes, eval_store, pr, run.pad_id, cfg.optim.micro_batch_size, device)
        write_scores(out, scores, counts, {"model": a.model, "store": cfg.data.store, "eval_store": a.eval_store,
                                           "steps": step, "layers": probes.layers, "tasks": probes.tasks,
                                           "mllm_forwards": probes.forwards, "protocol": protocol(cfg, pr)})
        log(f"wrote {out / 'probe_scores.json'} and {plot([out], out / 'probe_plot.png')}")
    teardown(world)
    return 0


def run(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())

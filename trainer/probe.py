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

from recipes.manifest import TASKS
from store import Location, Store, read_manifest
from trainer.build import TrainerError, assemble, load_or_explain, open_store
from trainer.config import PTConfig, load_config
from trainer.data import ImageRecipe, PTSample, collate
from trainer.heads import Predictor
from trainer.loop import run_cli, start, teardown, to_device, train
from trainer.loss import masked_smooth_l1
from trainer.sequence import MLLM, Layout, Projector, TaskTokens, load_mm_projector
from trainer.templates import PromptBuilder, get_template, prompt_prefix
from trainer.towers import CLIPTower, load_tower

PROBE_DEFAULTS = Path(__file__).parent / "configs" / "probe.yaml"


class ProbeSet(nn.Module):
    """Every (task, layer) probe over one frozen MLLM (trainer.sequence.MLLM). `forward(batch)` -> (sum of the
    probes' smooth-L1, terms): one MLLM forward, under no_grad, then each probe on its layer (float32), each its
    own loss term. A probe is the predictor with learned latents (trainer.heads.Predictor)."""

    def __init__(self, mllm: MLLM, target_shapes: dict[str, tuple[int, int]], layers: list[int], head: dict):
        super().__init__()
        self.mllm = mllm.requires_grad_(False)
        self.layers, self.tasks = list(layers), [t for t in TASKS if t in target_shapes]
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

    def predict(self, batch: dict) -> dict[str, dict[int, torch.Tensor]]:
        self.forwards += 1
        with torch.no_grad():
            hidden, _ = self.mllm.run(batch)
        out = {}
        for t in self.tasks:
            out[t] = {}
            for layer in self.layers:
                keys, mask = self.layout.keys(hidden[layer].float(), batch["text_mask"])
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


# ---- the probed model, in the three forms users hold it -----------------------------------------------------------

@dataclass
class Probed:
    """A model to probe, loaded: its MLLM's parts, tokenizer, chat template, image recipe, and what it is."""

    embed: nn.Module
    decoder: nn.Module
    tower: nn.Module
    projector: nn.Module
    task_tokens: TaskTokens
    tokenizer: object
    template: str
    image: ImageRecipe
    what: str

    def mllm(self, layout: Layout) -> MLLM:
        return MLLM(self.embed, self.decoder, None, self.tower, self.projector, self.task_tokens, layout,
                    self.image.mean, self.image.std)


def _llm_tower_projector(cfg: PTConfig, llm_name: str, tower_name: str, select: int, projector: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, llm_name)
    llm = load_or_explain("LLM", AutoModelForCausalLM.from_pretrained, llm_name, dtype=dtype)
    tower = load_or_explain("vision tower", load_tower, tower_name, select_layer=select, dtype=dtype)
    proj = Projector(tower.hidden_size, llm.config.hidden_size)
    try:
        load_mm_projector(projector, proj)
    except Exception as e:  # torch.load of arbitrary bytes raises arbitrary errors: all mean "not a projector"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrainerError(f"{projector} is not an mlp2x_gelu projector from the tower's width "
                           f"{tower.hidden_size} to the LLM's {llm.config.hidden_size} (LLaVA's mm_projector.bin, "
                           f"tensors model.mm_projector.{{0,2}}.{{weight,bias}}): {first}") from None
    return tokenizer, llm, tower, proj.to(dtype), ImageRecipe.from_pretrained(tower_name, cfg.image_aspect)


def _from_export(cfg: PTConfig, folder: Path, dtype) -> Probed:
    """(a) an olaf PT run's export/: its LLM, tower, projector and task tokens."""
    from safetensors.torch import load_file

    info = json.loads((folder / "config.json").read_text())
    tokenizer, llm, tower, proj, image = _llm_tower_projector(cfg, info["llm"], info["vision_tower"],
                                                              info["mm_vision_select_layer"],
                                                              folder / "mm_projector.bin", dtype)
    vectors = load_file(folder / "task_tokens.safetensors")
    tokens = TaskTokens({t: vectors[f"special_{t}_tokens"] for t in TASKS if f"special_{t}_tokens" in vectors},
                        info["task_tokens"], trainable=False)
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, tokens, tokenizer,
                  info["chat_template"], image, f"olaf PT export: {info['llm']}, {info['vision_tower']}")


def _from_llava_hf(cfg: PTConfig, model: str, config, dtype) -> Probed:
    """(c) a transformers LlavaForConditionalGeneration (e.g. llava-hf/llava-1.5-7b-hf)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    m = load_or_explain("LLaVA model", LlavaForConditionalGeneration.from_pretrained, model, dtype=dtype)
    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, model)
    tower = CLIPTower(m.model.vision_tower, config.vision_feature_layer)
    template = cfg.chat_template if cfg.chat_template != "llama_3" else "vicuna_v1"
    return Probed(m.get_input_embeddings(), m.model.language_model, tower, m.model.multi_modal_projector,
                  TaskTokens({}, {}), tokenizer, template, ImageRecipe.from_pretrained(model, cfg.image_aspect),
                  f"LlavaForConditionalGeneration {model}")


def load_probed(cfg: PTConfig, model: str, mm_projector: str | None, dtype) -> Probed:
    """The three forms: (a) a PT export folder, (c) a LlavaForConditionalGeneration, (b) an LLM with
    --vision-tower and --mm-projector."""
    from transformers import AutoConfig

    folder = Path(model)
    export_files = ("config.json", "mm_projector.bin", "task_tokens.safetensors")
    present = [f for f in export_files[1:] if (folder / f).is_file()]
    if present:  # an olaf export, whole or not
        missing = [f for f in export_files if not (folder / f).is_file()]
        if missing:
            raise TrainerError(f"{folder} is an incomplete PT export: {', '.join(missing)} missing (trainer.export "
                               f"writes all of {', '.join(export_files)})")
        return _from_export(cfg, folder, dtype)
    config = load_or_explain("model", AutoConfig.from_pretrained, model)
    if getattr(config, "model_type", None) == "llava":
        return _from_llava_hf(cfg, model, config, dtype)
    if not mm_projector:
        raise TrainerError(f"{model} is an LLM: give --vision-tower and --mm-projector (LLaVA's mm_projector.bin), "
                           f"or pass a PT export folder or a LlavaForConditionalGeneration checkpoint")
    tokenizer, llm, tower, proj, image = _llm_tower_projector(cfg, model, cfg.vision_tower, cfg.vision_select_layer,
                                                              Path(mm_projector), dtype)
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, TaskTokens({}, {}), tokenizer,
                  cfg.chat_template, image, f"LLM + tower + mm_projector.bin: {model}, {cfg.vision_tower}")


def build_probe(cfg: PTConfig, model: str, mm_projector: str | None, layers: list[int] | None, device, dtype,
                rank: int, world: int):
    store, expected = open_store(cfg)
    target_shapes = {t: tuple(store.manifest.tasks[t].shape) for t in cfg.tasks}
    torch.manual_seed(cfg.seed)
    probed = load_probed(cfg, model, mm_projector, dtype)
    template = get_template(probed.template)
    layout = Layout.of(len(prompt_prefix(probed.tokenizer, template)), probed.tower.num_tokens,
                       probed.task_tokens.pooled)
    mllm = probed.mllm(layout)
    n_layers = mllm.config.num_hidden_layers
    layers = layers or list(range(1, n_layers + 1))
    bad = [x for x in layers if not 1 <= x <= n_layers]
    if bad:
        raise TrainerError(f"--layers {bad}: the LLM has layers 1..{n_layers}")
    probes = ProbeSet(mllm, target_shapes, layers, cfg.predictor).to(device)
    builder = PromptBuilder(probed.tokenizer, template, max_text_tokens=cfg.max_length - layout.text_start)
    run = assemble(cfg, device, dtype, store, expected, probed.tokenizer, probes, builder, probed.image, rank, world,
                   "sdpa")
    return run, builder, probed.image, probed.what, expected


# ---- evaluation -------------------------------------------------------------------------------------------------

def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: the cosine similarity of the flattened prediction and target (the original's
    1 - CosineEmbeddingLoss on reshape(1, -1))."""
    return F.cosine_similarity(pred.float().flatten(1), target.float().flatten(1), dim=1)


@torch.no_grad()
def evaluate(probes: ProbeSet, eval_store: Store, builder, image, pad_id: int, batch_size: int, device):
    """{task: {layer: mean cosine}} and {task: samples} over every valid sample of the eval store's done shards."""
    tasks = probes.tasks
    sample = PTSample(builder, image, tasks, eval_store.manifest.tasks)
    sums = {t: {layer: 0.0 for layer in probes.layers} for t in tasks}
    counts = dict.fromkeys(tasks, 0)
    bad = set().union(*(eval_store.records[i].bad_indices() for i in eval_store.done_shards(tasks)))
    rows: list[dict] = []

    def flush():
        if not rows:
            return
        b = to_device({**collate(rows, pad_id), "positions": (0, len(rows)), "step": 0, "row_offset": 0}, device)
        preds = probes.predict(b)
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
    p.add_argument("--model", required=True, help="the MLLM to probe: a PT export folder, an LLM (with "
                                                  "--vision-tower and --mm-projector), or a LlavaForConditionalGeneration")
    p.add_argument("--vision-tower", help="the base encoder, for an LLM MODEL")
    p.add_argument("--mm-projector", help="LLaVA's mm_projector.bin, for an LLM MODEL")
    p.add_argument("--chat-template", help="llama_3, phi_3 or vicuna_v1 (default: the export's; vicuna_v1 for llava-hf)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--layers", help="layers to probe, e.g. 1-32 or 8,12,20 (default: every layer)")
    p.add_argument("--tasks", help="comma list (default: every task of the store)")
    p.add_argument("--teachers-manifest", help="teacher manifest the stores must match (default: ola_vlm.yaml)")
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
    tasks = a.tasks or ",".join(t for t in TASKS if t in read_manifest(Location(a.store)).tasks)
    try:
        cfg = load_config([PROBE_DEFAULTS, *a.config], {
            "store": a.store, "output_dir": a.output_dir, "vision_tower": a.vision_tower,
            "chat_template": a.chat_template, "teachers_manifest": a.teachers_manifest, "max_steps": a.max_steps,
            "resume": a.resume or None, "tasks": tasks, "llm": a.model}, a.set)
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
        print(f"wrote {plot(a.runs, a.out or a.runs[0] / 'probe_plot.png')}")
        return 0
    a, cfg = parse_args(argv)
    rank, world, device, dtype, log = start(cfg)
    out = Path(cfg.output_dir)
    eval_store = Store(a.eval_store)
    run, builder, image, what, expected = build_probe(cfg, a.model, a.mm_projector, a.layers, device, dtype,
                                            rank, world)
    eval_store.require(cfg.tasks, expected_teachers=expected, allow_partial=cfg.allow_partial_store, formats=["wds"])
    probes = run.model
    log(f"probing {what}: {len(probes.layers)} layers x {len(probes.tasks)} tasks = {len(probes.probes)} probes "
        f"({sum(p.numel() for p in run.trainable):,} parameters); {run.stream.num_samples:,} training samples, "
        f"{run.total_steps} steps of {cfg.global_batch_size}")
    step = train(run, out, rank, world, log)
    if rank == 0:
        from safetensors.torch import save_file

        (out / "probes").mkdir(parents=True, exist_ok=True)
        for name, probe in probes.probes.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()},
                      out / "probes" / f"{name}.safetensors")
        probes.eval()
        scores, counts = evaluate(probes, eval_store, builder, image, run.pad_id, cfg.micro_batch_size, device)
        write_scores(out, scores, counts, {"model": a.model, "store": cfg.store, "eval_store": a.eval_store,
                                           "steps": step, "layers": probes.layers, "tasks": probes.tasks,
                                           "mllm_forwards": probes.forwards})
        log(f"wrote {out / 'probe_scores.json'} and {plot([out], out / 'probe_plot.png')}")
    teardown(world)
    return 0


def run(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())

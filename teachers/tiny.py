"""Tiny random-weight stand-ins for the three teachers, for tests and the demo.

    python -m teachers.tiny OUT_DIR [--seed 0] [--shape-true]

Builds each teacher's real HF model class from a real config class (same token grids: 224 px / patch 14 for
gen, 336 px / patch 14 with 24 blocks for depth, 800 px / Swin stage-4 25x25 for seg; small widths), saves it
with `save_pretrained` exactly as the hub checkpoints are laid out, and writes OUT_DIR/teachers.yaml: the
default manifest's recipes with the weights pointing at these folders (and teachers_probe.yaml,
teachers_probe_eval.yaml: the probing manifests' recipes over them; teachers_hf.yaml: the three plus two hf_vision
teachers, `dino` and `siglip`, tiny DINOv2-with-registers and SigLIP models). The targets they give are meaningless:
they exist so that every other part of olaf runs its real code paths without downloading anything.
`--shape-true` writes cheap stand-ins with the real target shapes instead (teachers/standin.py), to measure the
data path at real sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from recipes.manifest import DEFAULT_MANIFEST, DINO_MANIFEST, PROBE_EVAL_MANIFEST, PROBE_MANIFEST, load_manifest
from teachers import depth, gen, seg, standin

TINY_BUILDERS = {"gen": gen.tiny_model, "depth": depth.tiny_model, "seg": seg.tiny_model}
STAND_IN_NOTE = "RANDOM-WEIGHT STAND-INS built by teachers.tiny: targets are meaningless, for tests and demos only"
SHAPE_TRUE_NOTE = ("SHAPE-TRUE STAND-INS built by teachers.tiny --shape-true: real recipes and target shapes, cheap "
                   "random models; targets are meaningless, for measuring the data path only")


def build(out_dir: str | Path, seed: int = 0, fidelity: str | None = None, shape_true: bool = False) -> Path:
    """Write the tiny teachers (or, `shape_true`, the shape-true stand-ins) and OUT_DIR/teachers.yaml; returns
    the manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    data["name"] = "ola_vlm_shape_true_stand_ins" if shape_true else "ola_vlm_tiny_random"
    data["description"] = SHAPE_TRUE_NOTE if shape_true else STAND_IN_NOTE
    if fidelity:
        data["fidelity"] = fidelity
    for task, make in TINY_BUILDERS.items():
        torch.manual_seed(seed + {"gen": 0, "depth": 1, "seg": 2}[task])
        spec = data["teachers"][task]
        if shape_true:  # the real recipe and output shape; a cheap model behind them
            model = standin.build(task, spec["output_shape"][1]).eval()
            spec["architecture"] = standin.StandInTeacher.architecture
            spec["feature"] = {"stand_in": dict(zip(("pool", "kernel"), standin.GEOMETRY[task], strict=True))}
            spec["weights"] = {"path": task}
            model.save_pretrained(out / task)
            continue
        model = make().eval()
        spec["compute_dtype"] = "float32"  # CPU stand-ins: what a CPU run computes in, so stores and manifest agree
        variant = spec["weights"].get("variant")
        if variant == "fp16":  # as the real image encoder is published: fp16 weights in model.fp16.safetensors
            model = model.half()
        model.save_pretrained(out / task, variant=variant)
        spec["weights"] = {"path": task, **({"variant": variant} if variant else {})}
        spec["output_shape"] = [spec["output_shape"][0], output_width(task, model.config)]
    path = out / "teachers.yaml"
    header = f"# {STAND_IN_NOTE}\n# Recipes are those of {DEFAULT_MANIFEST.name}; only weights and widths differ.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120), encoding="utf-8")
    load_manifest(path)  # what we wrote must parse
    if not shape_true:
        write_probe_manifests(out)
        write_hf_vision(out, seed)
    return path


def tiny_hf_vision() -> dict:
    """name -> (a tiny random model of a real transformers vision class, its teacher entry over ola_vlm_dino.yaml's
    recipe): `dino`, DINOv2 with 4 registers on the 336 px / patch 14 grid (576 tokens), and `siglip`, SigLIP's
    vision tower at 224 px / patch 16, its second-to-last layer's 196 patch tokens."""
    from transformers import AutoModel, Dinov2WithRegistersConfig, SiglipVisionConfig

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    dino = yaml.safe_load(DINO_MANIFEST.read_text())["teachers"]["dino"]
    dino.update(compute_dtype="float32", output_shape=[576, 32])
    siglip = {"architecture": "hf_vision", "compute_dtype": "float32",
              "preprocess": {"ops": [{"op": "resize", "height": 224, "width": 224, "resample": "bicubic"}],
                             "input_size": [224, 224], "channel_order": "RGB", "rescale": 1 / 255,
                             "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
              "feature": {"layer": -2, "tokens": "patch"}, "output_shape": [196, 32]}
    return {"dino": (AutoModel.from_config(Dinov2WithRegistersConfig(**small, patch_size=14, image_size=336,
                                                                      num_register_tokens=4)), dino),
            "siglip": (AutoModel.from_config(SiglipVisionConfig(**small, patch_size=16, image_size=224)), siglip)}


def write_hf_vision(out: Path, seed: int) -> Path:
    """OUT/dino, OUT/siglip (tiny_hf_vision) and OUT/teachers_hf.yaml: teachers.yaml's three plus these two, a
    manifest to add a fourth or fifth task to a store of teachers.yaml with `--tasks dino`."""
    torch.manual_seed(seed + 3)
    teachers = {}
    for name, (model, entry) in tiny_hf_vision().items():
        model.eval().save_pretrained(out / name)
        teachers[name] = {**entry, "weights": {"path": name}}
    data = {"format": "olaf.teachers/1", "name": "ola_vlm_hf_tiny_random", "extends": "teachers.yaml",
            "description": STAND_IN_NOTE, "teachers": teachers}
    path = out / "teachers_hf.yaml"
    path.write_text(f"# {STAND_IN_NOTE}\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
    load_manifest(path)
    return path


# the probing manifests (recipes/manifests/ola_vlm_probe*.yaml) over the tiny teachers: their own overrides, on top
# of OUT_DIR/teachers.yaml instead of ola_vlm.yaml
PROBE_COPIES = {PROBE_MANIFEST: "teachers_probe.yaml", PROBE_EVAL_MANIFEST: "teachers_probe_eval.yaml"}


def write_probe_manifests(out: Path) -> None:
    bases = {DEFAULT_MANIFEST.name: "teachers.yaml", **{src.name: dst for src, dst in PROBE_COPIES.items()}}
    for src, dst in PROBE_COPIES.items():
        data = yaml.safe_load(src.read_text())
        data["extends"] = bases[data["extends"]]
        data["name"] = f"{data['name']}_tiny_random"
        header = f"# {STAND_IN_NOTE}\n# {src.name}'s overrides over these stand-ins.\n"
        (out / dst).write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
        load_manifest(out / dst)


def output_width(task: str, cfg) -> int:
    """The target width a teacher config gives (projection dim, DINOv2 width, Swin stage-4 channels)."""
    if task == "gen":
        return cfg.projection_dim
    if task == "depth":
        return cfg.backbone_config.hidden_size
    return cfg.backbone_config.embed_dim * 2 ** (len(cfg.backbone_config.depths) - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m teachers.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for the tiny checkpoints and teachers.yaml")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.add_argument("--fidelity", choices=["original", "corrected"], default=None,
                   help="recipe fidelity to write into the manifest (default: the manifest's, original)")
    p.add_argument("--shape-true", action="store_true",
                   help="cheap stand-ins with the real target shapes (1x1024, 576x1024, 576x1536) instead")
    args = p.parse_args(argv)
    path = build(args.out_dir, seed=args.seed, fidelity=args.fidelity, shape_true=args.shape_true)
    print(f"wrote {path}\nNOTE: {SHAPE_TRUE_NOTE if args.shape_true else STAND_IN_NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

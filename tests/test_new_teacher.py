"""A teacher beyond OLA-VLM's three (teachers.tiny's `dino`: a tiny DINOv2 with registers, hf_vision) as a task
like the others: its stored targets are transformers' own features, PT distils it beside the three and alone,
probing measures it, the inspector shows it, and the extraction adds it to an existing store as it adds the three
(the slow tier: a Ray job, byte for byte against the one-pass reference, `verify --full` clean)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import EXTRACT_SHARD, call, extract, extraction_args, same_data, trainer_args

import store
from pipeline.inspect import main as inspect_main
from recipes.manifest import load_manifest
from recipes.preprocess import preprocess
from trainer.pt import run as trainer

FOUR = ("gen", "depth", "seg", "dino")


@pytest.fixture(scope="module")
def hf_manifest(tiny_teachers) -> Path:
    return Path(tiny_teachers).parent / "teachers_hf.yaml"


@pytest.fixture(scope="module")
def four_task_store(tmp_path_factory, trainer_dataset, hf_manifest):
    from support.reference import reference_store

    return reference_store(tmp_path_factory.mktemp("four") / "store", trainer_dataset, hf_manifest, tasks=FOUR,
                           teachers_yaml=True)


def check_targets(url, manifest, task, dataset, own) -> int:
    """Each valid sample's stored `task` target equals `own(model output)` for the recipe's pixels, computed here
    with transformers, within fp16's rounding of the fp32 value; returns how many were checked."""
    from PIL import Image
    from transformers import AutoModel

    s = store.Store(url)
    spec = load_manifest(manifest).teachers[task]
    model = AutoModel.from_pretrained(Path(manifest).parent / task).eval()
    mean, std = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1), torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
    checked = 0
    for r in json.loads(Path(dataset[0]).read_text()):
        sample = s.get(r["id"])
        if not sample["valid"][task]:
            continue
        with Image.open(Path(dataset[1]) / r["image"]) as img:
            pixels = preprocess(spec, img.convert("RGB"))
        x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
        with torch.no_grad():
            want = own(model(pixel_values=x, output_hidden_states=True))[0]
        got = torch.as_tensor(np.asarray(sample["targets"][task], dtype=np.float32))
        torch.testing.assert_close(got, want, rtol=2 ** -11, atol=1e-5)
        checked += 1
    return checked


def test_the_stored_dino_targets_are_transformers_own_features(four_task_store, hf_manifest, trainer_dataset):
    """DINOv2's last_hidden_state without its class and 4 register tokens."""
    s = store.Store(four_task_store)
    assert s.tasks == list(FOUR) and s.manifest.tasks["dino"].shape == (576, 32)
    n = check_targets(four_task_store, hf_manifest, "dino", trainer_dataset, lambda out: out.last_hidden_state[:, 5:])
    assert n >= 20


def test_a_store_of_a_tiny_siglip_teacher(tmp_path, hf_manifest, trainer_dataset):
    """A second store, from the tiny SigLIP vision tower: its second-to-last layer's 196 patch tokens (no class
    token)."""
    from support.reference import reference_store

    url = reference_store(tmp_path / "siglip", trainer_dataset, hf_manifest, tasks=("siglip",), teachers_yaml=True)
    assert store.Store(url).manifest.tasks["siglip"].shape == (196, 32)
    assert check_targets(url, hf_manifest, "siglip", trainer_dataset, lambda out: out.hidden_states[-2]) >= 20


@pytest.mark.parametrize("tasks", ["[gen,depth,seg,dino]", "[dino]"])
def test_pt_distils_the_new_task_beside_the_three_and_alone(tmp_path, four_task_store, tiny_models, hf_manifest,
                                                            tasks):
    out = tmp_path / "out"
    rc, log = call(trainer, trainer_args(four_task_store, tiny_models, hf_manifest, out, "--max-steps", "2",
                                         "--set", f"tasks={tasks}", "--set", "num_workers=0", "--set", "log_every=1"))
    assert rc == 0, log
    last = json.loads((out / "logs" / "train.jsonl").read_text().splitlines()[-1])
    # a 576-token grid: trained as seg is by default, layers 10 and 18, 576 special tokens pooled to 8
    assert {"dino", "dino/10/sl1", "dino/10/nce", "dino/18/sl1", "dino/18/nce"} <= set(last)
    assert np.isfinite(last["loss"]) and last["dino"] > 0
    cfg = json.loads((out / "config.json").read_text())["tasks"]
    assert cfg["special_tokens"]["dino"] == 576 and cfg["task_tokens"]["dino"] == 8
    assert cfg["layers"]["dino"] == [10, 18] and ("seg" in last) == ("seg" in tasks)


def test_a_new_task_s_settings_are_checked_and_the_ola_vlm_export_refuses_it(tmp_path, four_task_store, tiny_models,
                                                                              hf_manifest):
    rc, log = call(trainer, trainer_args(four_task_store, tiny_models, hf_manifest, tmp_path / "o", "--set",
                                         "tasks=[dino]", "--set", "tasks.special_tokens={dino: 96}"))
    assert rc == 2 and "the predictor makes 96 tokens" in log and "576" in log, log
    rc, log = call(trainer, trainer_args(four_task_store, tiny_models, hf_manifest, tmp_path / "o2", "--set",
                                         "tasks=[Dino]"))
    assert rc == 2 and "not a safe identifier" in log


def test_the_inspector_shows_the_new_task(tmp_path, four_task_store):
    rc, log = call(inspect_main, [str(four_task_store), "stats"])
    assert rc == 0 and "dino" in log, log
    rc, log = call(inspect_main, [str(four_task_store), "render", "--out", str(tmp_path / "r.png")])
    assert rc == 0 and (tmp_path / "r.png").is_file(), log
    assert "dino" in log  # its PCA map beside depth's and seg's


@pytest.mark.slow
def test_the_extraction_adds_the_new_task_to_a_store_of_the_three(tmp_path, trainer_dataset, tiny_teachers,
                                                                  hf_manifest, ray_head):
    from support.reference import reference_store

    out = tmp_path / "store"
    argv = extraction_args(trainer_dataset, out, tiny_teachers, "--address", ray_head)
    rc, log = extract([*argv, "--tasks", "gen,depth,seg"])
    assert rc == 0, log
    hf = extraction_args(trainer_dataset, out, hf_manifest, "--address", ray_head)
    rc, log = extract([*hf, "--tasks", "dino"])
    assert rc == 0, log
    s = store.Store(out)
    assert s.tasks == list(FOUR) and s.manifest.finished and "dino" in s.teachers()["teachers"]
    ref = reference_store(tmp_path / "ref", trainer_dataset, hf_manifest, tasks=FOUR, shard=EXTRACT_SHARD)
    same_data(out, ref)
    rc, log = call(inspect_main, [str(out), "verify", "--full"])
    assert rc == 0, log
    shutil.rmtree(ref)


def test_probing_measures_the_new_task_at_every_layer(tmp_path, four_task_store, tiny_models, hf_manifest):
    from test_probe import probe

    from trainer.sequence import Projector

    torch.manual_seed(0)
    proj = Projector(32, 64)  # the tiny tower's and LLM's widths
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, tmp_path / "mm_projector.bin")
    models = Path(tiny_models).parent
    out = tmp_path / "probe"
    rc, log = probe(["--store", str(four_task_store), "--eval-store", str(four_task_store), "--model",
                     str(models / "llm"), "--vision-tower", str(models / "clip_vision_tower"), "--mm-projector",
                     str(tmp_path / "mm_projector.bin"), "--teachers-manifest", str(hf_manifest), "--layers", "1,10,20",
                     "--output-dir", str(out), "--max-steps", "1", "--set", "global_batch_size=4", "--set",
                     "micro_batch_size=4", "--set", "num_workers=0"])
    assert rc == 0, log
    scores = json.loads((out / "probe_scores.json").read_text())["scores"]
    assert set(scores) == set(FOUR) and set(scores["dino"]) == {"1", "10", "20"}
    assert all(np.isfinite(v) for v in scores["dino"].values())

"""trainer.pt on CPU with tiny models: loss terms, sequence layout, masking, learning, resume, torchrun, export."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from helpers import REPO, TRAINED_STEPS, call, env, kill_trainer_after, trainer_args, wait_for

from trainer import loss as L
from trainer.config import PTConfig
from trainer.heads import Predictor
from trainer.pt import run as trainer
from trainer.sequence import Layout
from trainer.templates import TEMPLATES, PromptBuilder


def log_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]


# ---- the loss, against an independent computation --------------------------------------------------------------

def ref_smooth_l1(p, t, valid):
    vals = []
    for i in range(len(p)):
        if valid[i]:
            d = np.abs(p[i] - t[i])
            vals.append(np.where(d < 1, 0.5 * d * d, d - 0.5).mean())
    return float(np.mean(vals)) if vals else 0.0


def ref_infonce(p, t_all, valid_rows, valid_all, scale, offset):
    """Row by row: -log softmax over every valid target of the global batch."""
    s = min(math.exp(scale), 100.0)
    unit = lambda x: x.reshape(len(x), -1) / np.linalg.norm(x.reshape(len(x), -1), axis=1, keepdims=True)  # noqa: E731
    pn, tn = unit(p.astype(np.float64)), unit(t_all.astype(np.float64))
    losses = []
    for i in range(len(p)):
        if not valid_rows[i]:
            continue
        cols = [j for j in range(len(t_all)) if valid_all[j]]
        logits = np.array([s * pn[i] @ tn[j] for j in cols])
        k = cols.index(offset + i)
        losses.append(-(logits[k] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
    return float(np.mean(losses))


def test_loss_terms_match_an_independent_computation():
    """A micro-batch of 6 at rows 4..9 of a global batch of 10: InfoNCE's columns are all 10 targets."""
    g = torch.Generator().manual_seed(0)
    cfg = PTConfig()
    everyone = {"gen": torch.randn(10, 1, 16, generator=g), "depth": torch.randn(10, 9, 8, generator=g) * 3}
    valid_all = {"gen": torch.tensor([1, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
                 "depth": torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)}
    mine = slice(4, 10)
    preds = {"gen": {12: torch.randn(6, 1, 16, generator=g), 20: torch.randn(6, 1, 16, generator=g)},
             "depth": {8: torch.randn(6, 9, 8, generator=g)}}
    targets = {t: x[mine] for t, x in everyone.items()}
    valid = {t: v[mine] for t, v in valid_all.items()}
    negatives = L.step_negatives([{"targets": everyone, "valid": valid_all}], ["gen", "depth"])
    scales = {"gen": torch.tensor(2.0), "depth": torch.tensor(5.0)}  # exp(5) > 100: the clamp applies
    ntp = torch.tensor(1.25)
    total, terms = L.pt_loss(ntp, preds, targets, valid, negatives, 4, scales, cfg)
    want = 1.25
    for task, by_layer in preds.items():
        tsum = 0.0
        for layer, p in by_layer.items():
            sl1 = ref_smooth_l1(p.numpy(), targets[task].numpy(), valid[task].numpy())
            nce = ref_infonce(p.numpy(), everyone[task].numpy(), valid[task].numpy(), valid_all[task].numpy(),
                              float(scales[task]), 4)
            assert terms[f"{task}/{layer}/sl1"].item() == pytest.approx(sl1, rel=1e-5)
            assert terms[f"{task}/{layer}/nce"].item() == pytest.approx(nce, rel=1e-5)
            tsum += sl1 + 0.3 * nce
        want += 0.5 * tsum
    assert total.item() == pytest.approx(want, rel=1e-5)


def test_invalid_samples_are_masked_out_of_both_terms():
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(5, 4, 8, generator=g), torch.randn(5, 4, 8, generator=g)
    valid = torch.tensor([True, True, False, True, True])
    garbage = t.clone()
    garbage[2] = 1e6  # an invalid target, whatever it holds, changes nothing
    keep = valid.nonzero().flatten()
    s = torch.tensor(2.0)

    def nce(p, t, v):
        return L.infonce(p, v, L.Negatives.of([t], [v]), 0, s)

    assert L.masked_smooth_l1(p, garbage, valid).item() == pytest.approx(L.masked_smooth_l1(p[keep], t[keep], valid[keep]).item())
    assert nce(p, garbage, valid).item() == pytest.approx(nce(p[keep], t[keep], valid[keep]).item(), rel=1e-6)
    # no valid sample: zero, and a graph that reaches the prediction and the scale with zero gradients (not NaN)
    p.requires_grad_(True)
    s.requires_grad_(True)
    none = torch.zeros(5, dtype=torch.bool)
    out = L.masked_smooth_l1(p, t, none) + nce(p, t, none)
    out.backward()
    assert out.item() == 0 and torch.equal(p.grad, torch.zeros_like(p)) and s.grad is not None and s.grad.item() == 0


def test_ntp_loss_equals_the_lm_s_own_loss(tiny_models):
    """olaf computes logits only where text is predicted; the loss is the LM's own labels-based one."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(Path(tiny_models).parent / "llm")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, llm.config.vocab_size, (3, 30), generator=g)
    text_start = 21
    text_labels = ids[:, text_start:].clone()
    text_labels[:, :2] = -100  # the question is not labelled
    text_labels[2, 5:] = -100  # a shorter sample
    full = torch.cat([torch.full((3, text_start), -100), text_labels], dim=1)
    want = llm(input_ids=ids, labels=full).loss
    logits = llm(input_ids=ids, logits_to_keep=ids.shape[1] - text_start + 1).logits[:, :-1]
    torch.testing.assert_close(L.ntp_loss(logits, text_labels), want, rtol=1e-5, atol=1e-6)
    assert L.ntp_loss(logits, torch.full_like(text_labels, -100)).item() == 0.0  # nothing labelled: 0, not NaN


def _gloo_worker(rank, world, port, result_dir, p, t, valid):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # each rank: two micro-batches of 2 (its rows 4r..4r+3 of the global batch of 8)
    mine = [slice(4 * rank, 4 * rank + 2), slice(4 * rank + 2, 4 * rank + 4)]
    neg = L.Negatives.of([t[sl] for sl in mine], [valid[sl] for sl in mine])
    vals = [L.infonce(p[sl], valid[sl], neg, sl.start, torch.tensor(2.0)).item() for sl in mine]
    Path(result_dir, f"{rank}.json").write_text(json.dumps(vals))
    dist.destroy_process_group()


def test_infonce_columns_are_the_whole_global_batch_over_a_gloo_group(tmp_path):
    g = torch.Generator().manual_seed(2)
    p, t = torch.randn(8, 3, 5, generator=g), torch.randn(8, 3, 5, generator=g)
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    torch.multiprocessing.spawn(_gloo_worker, args=(2, free_port(), str(tmp_path), p, t, valid), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        for k, start in enumerate((4 * rank, 4 * rank + 2)):
            sl = slice(start, start + 2)
            want = ref_infonce(p[sl].numpy(), t.numpy(), valid[sl].numpy(), valid.numpy(), 2.0, start)
            assert got[k] == pytest.approx(want, rel=1e-5)  # negatives: both ranks' micro-batches


# ---- the sequence layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["llama_3", "phi_3"])
def test_image_offset_and_predictor_keys(tiny_models, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(tiny_models).parent / "llm")
    t = TEMPLATES[template]
    builder = PromptBuilder(tok, t, 4096)
    record = {"conversations": [{"from": "human", "value": "Describe the image.\n<image>"},
                                {"from": "gpt", "value": "a small red square in the center on a gray background."}]}
    # independently: put an atomic special token where the image goes and find it in the full tokenisation
    full = tok(t.system + t.sep + t.user_start + "<pad>" + "\nDescribe the image." + t.sep + t.assistant_start,
               add_special_tokens=False)["input_ids"]
    expected = full.index(tok.pad_token_id) + (1 if tok.bos_token_id is not None else 0)
    assert builder.image_offset == expected
    x = builder(record)
    assert tok.decode([i for i in x.text_labels if i >= 0]) == "a small red square in the center on a gray background." + t.sep
    assert tok.decode(x.text_ids).startswith("\nDescribe the image." + t.sep)
    # keys: prefix + image + the task's own tokens + text, padding masked, other tasks' tokens left out
    P, image = builder.image_offset, 576
    layout = Layout.of(P, image, {"gen": 8, "depth": 8, "seg": 8})
    assert layout.task_slots == {"gen": (P + 576, P + 584), "depth": (P + 584, P + 592), "seg": (P + 592, P + 600)}
    n_text = 5
    hidden = torch.arange(layout.text_start + n_text, dtype=torch.float32).view(1, -1, 1).repeat(2, 1, 3)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    keys, mask = layout.keys(hidden, text_mask, "depth")
    pos = keys[0, :, 0].long().tolist()
    assert pos == list(range(P + 576)) + list(range(P + 584, P + 592)) + list(range(P + 600, P + 605))
    assert mask[0].all() and mask[1].tolist() == [True] * (P + 576 + 8 + 3) + [False, False]


def test_predictor_ignores_masked_keys():
    torch.manual_seed(0)
    pred = Predictor(16, 8, heads=4, dim_head=4).eval()
    keys, latents = torch.randn(1, 10, 16), torch.randn(1, 3, 16)
    mask = torch.tensor([[True] * 7 + [False] * 3])
    changed = keys.clone()
    changed[0, 7:] = 100.0  # what padding holds must not matter
    torch.testing.assert_close(pred(keys, mask, latents), pred(changed, mask, latents))
    torch.testing.assert_close(pred(keys, mask, latents), pred(keys[:, :7], mask[:, :7], latents))


# ---- training runs ---------------------------------------------------------------------------------------------

def test_loss_decreases_on_the_sample_data(trained):
    log = log_of(trained)
    assert [r["step"] for r in log] == list(range(1, TRAINED_STEPS + 1))
    first = np.mean([r["loss"] for r in log[:3]])
    last = np.mean([r["loss"] for r in log[-3:]])
    assert last < 0.9 * first, (first, last)
    for task in ("gen", "depth", "seg"):  # every embedding loss learns, not only one
        assert np.mean([r[task] for r in log[-3:]]) < np.mean([r[task] for r in log[:3]])
    assert all(r["valid/depth"] == 4 for r in log)  # bad images were skipped, never trained on


def test_export_loads_into_a_fresh_projector(trained):
    from safetensors.torch import load_file

    from trainer.sequence import Projector

    exp = trained / "export"
    info = json.loads((exp / "config.json").read_text())
    assert info["layers"] == {"gen": [12, 20], "depth": [8, 20], "seg": [10, 18]} and info["num_image_tokens"] == 576
    assert info["mm_projector_type"] == "mlp2x_gelu" and info["steps"] == TRAINED_STEPS
    fresh = Projector(info["mm_hidden_size"], info["hidden_size"])
    saved = torch.load(exp / "mm_projector.bin", map_location="cpu", weights_only=True)
    # what LLaVA's --pretrain_mm_mlp_adapter does with it (its get_w), written here, not olaf's reader
    fresh.load_state_dict({k.split("mm_projector.")[1]: v for k, v in saved.items() if "mm_projector." in k})
    last = load_file(sorted((trained / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, last[f"projector.{k}"])
    keys = set(torch.load(exp / "mm_projector.bin", weights_only=True))
    assert keys == {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                    "model.mm_projector.2.bias"}
    tokens = load_file(exp / "task_tokens.safetensors")
    assert tokens["special_depth_tokens"].shape == (576, 64) and tokens["special_gen_tokens"].shape == (8, 64)
    heads = load_file(exp / "predictors.safetensors")
    assert {k.split(".")[1] for k in heads if k.startswith("predictors.")} == {"gen_12", "gen_20", "depth_8",
                                                                                "depth_20", "seg_10", "seg_18"}
    # inner widths as the released heads: depth at the LLM's width, gen and seg at their targets'
    width, shapes = info["hidden_size"], info["target_shapes"]
    assert heads["predictors.depth_8.proj_in.weight"].shape == (width, width)
    assert heads["predictors.seg_10.proj_in.weight"].shape == (shapes["seg"][1], width)
    assert heads["predictors.gen_12.proj_in.weight"].shape == (shapes["gen"][1], width)


def test_plot_writes_a_loss_curve_png(trained):
    from PIL import Image

    from trainer.plot import main as plot

    rc, out = call(plot, [trained])
    assert rc == 0, out
    img = np.asarray(Image.open(trained / "loss.png").convert("RGB"))
    assert img.shape == (760, 1000, 3) and (img < 250).any(axis=2).mean() > 0.02  # something is drawn


@pytest.mark.slow
def test_kill_and_resume_give_the_same_losses(tmp_path, trainer_store, tiny_models, tiny_teachers, trained):
    out = tmp_path / "out"
    argv = trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", str(TRAINED_STEPS))
    kill_trainer_after(argv, out, 4)
    assert not (out / "export").exists()
    rc, log = call(trainer, argv + ["--resume"])
    assert rc == 0, log
    assert "resumed from" in log
    a, b = log_of(trained), log_of(out)
    assert [r["step"] for r in b] == list(range(1, TRAINED_STEPS + 1))
    for ra, rb in zip(a, b, strict=True):  # the same samples in the same order, the same optimizer state
        for k, v in ra.items():
            if not k.endswith("_per_s"):
                assert rb[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (ra["step"], k)


def test_refuses_to_overwrite_a_run_without_resume(trained, trainer_store, tiny_models, tiny_teachers):
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, trained, "--max-steps", "2"))
    assert rc == 2 and "pass --resume" in log


@pytest.mark.slow
def test_a_run_killed_on_two_processes_continues_on_one(tmp_path, trainer_store, tiny_models, tiny_teachers):
    """Elastic: `torchrun --nproc_per_node 2` (global batch 8 = 2 x 4) killed with SIGKILL after its step-2
    checkpoint, resumed with one process (2 accumulation steps x 4). Every step, on two processes as on one, has
    the samples and, to fp32 round-off, the losses of an uninterrupted one-process run."""
    torchrun = str(Path(sys.executable).parent / "torchrun")

    def argv(out):
        return trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "4",
                            "--set", "global_batch_size=8", "--set", "num_workers=1", "--set", "save_every=2")

    out = tmp_path / "out"
    p = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                          str(free_port()), "-m", "trainer.pt", *argv(out)], cwd=REPO, env=env(OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (out / "checkpoints" / "step-000002").exists() or p.poll() is not None, what="step 2")
    assert p.poll() is None, "the run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    ref = tmp_path / "ref"
    rc, log = call(trainer, argv(ref))  # the uninterrupted run, on one process
    assert rc == 0, log
    assert not (out / "export").exists()
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["data"]["position"] == 2 * 8  # one global position, not one per rank
    rc, log = call(trainer, argv(out) + ["--resume", "--set", "num_workers=2"])
    assert rc == 0, log
    assert "resumed from" in log and "global batch 8 = 2 x 4 x 1 processes" in log
    a, b = log_of(ref), log_of(out)
    assert [r["step"] for r in b] == list(range(1, 5)) and [r["samples"] for r in b] == [8] * 4
    for ra, rb in zip(a, b, strict=True):  # steps 1-2 on two processes, 3-4 on one
        for k, v in ra.items():
            if not k.endswith("_per_s"):
                assert rb[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (ra["step"], k)
    ids = lambda out: [json.loads(x)["ids"] for x in (out / "logs" / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert ids(out) == ids(ref) and len(ids(ref)) == 4 and all(len(x) == 8 for x in ids(ref))


def test_trains_with_the_teachers_package_unimportable(tmp_path, trainer_store, tiny_models, tiny_teachers,
                                                       monkeypatch):
    """With every `import teachers` failing, a run trains and exports: nothing the trainer does, lazily neither,
    reaches a teacher (the architecture test checks the imports; this checks the run)."""
    for name in [m for m in sys.modules if m == "teachers" or m.startswith("teachers.")] + ["teachers"]:
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "out"
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "2"))
    assert rc == 0, log
    assert len(log_of(out)) == 2 and (out / "export" / "mm_projector.bin").exists()


def test_a_store_from_other_teachers_is_refused(tmp_path, trainer_store, tiny_models, tiny_teachers):
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "out",
                                         "--fidelity", "corrected", "--max-steps", "2"))
    assert rc == 2
    assert "teacher mismatch: depth: recipe differs" in log and "Traceback" not in log


def test_config_values_follow_the_field_types(tmp_path):
    from trainer.config import load_config

    (tmp_path / "c.yaml").write_text("learning_rate: 3e-3\nmax_steps: 10\n")  # YAML 1.1 reads 3e-3 as a string
    cfg = load_config([tmp_path / "c.yaml"], {"store": "s", "output_dir": "o"},
                      ["micro_batch_size=2", "global_batch_size=4", "gradient_checkpointing=false", "max_grad_norm=null",
                       "layers={gen: [1], depth: [2], seg: [3]}"])
    assert cfg.optim.learning_rate == 0.003 and cfg.optim.max_steps == 10 and cfg.optim.micro_batch_size == 2
    assert cfg.model.gradient_checkpointing is False and cfg.optim.max_grad_norm is None and cfg.tasks.layers["seg"] == [3]
    for bad, msg in (("micro_batch_size=two", "expected int"), ("nope", "expected section.key=value"),
                     ("nope=1", "unknown config key 'nope'"), ("global_batch_size=30", "not a multiple"),
                     ("optim.learning_rat=1", "did you mean 'optim.learning_rate'")):
        with pytest.raises(ValueError, match=msg):
            load_config([], {"store": "s", "output_dir": "o"}, [bad])


def test_config_sections_load_every_flat_key_of_before(tmp_path):
    """The config is typed sections (model, data, tasks, optim, run, vlora, probe); YAMLs and saved configs of olaf
    before them, flat, load to the same values, mapped by one table; `--set section.key=value`."""
    import dataclasses

    import yaml

    from trainer.config import FLAT, SECTION_ONLY, PTConfig, load_config, saved

    flat = {"llm": "x/llm", "store": "s", "output_dir": "o", "tasks": ["gen", "seg"], "layers": {"gen": [3], "seg": [4]},
            "task_tokens": {"gen": 2, "seg": 4}, "special_tokens": {"gen": 2, "seg": 8}, "learning_rate": 2e-3,
            "global_batch_size": 8, "micro_batch_size": 2, "order_mix": 8, "save_every": 3, "probe_answer": "record",
            "probe_eval_resize": None, "probe_task_tokens": "keep", "precision": "fp32", "resume": True}
    (tmp_path / "flat.yaml").write_text(yaml.safe_dump(flat))
    nested = {"model": {"llm": "x/llm", "precision": "fp32"}, "data": {"store": "s", "order_mix": 8},
              "tasks": {"names": ["gen", "seg"], "layers": {"gen": [3], "seg": [4]}, "task_tokens": {"gen": 2, "seg": 4},
                        "special_tokens": {"gen": 2, "seg": 8}},
              "optim": {"learning_rate": 2e-3, "global_batch_size": 8, "micro_batch_size": 2},
              "run": {"output_dir": "o", "save_every": 3, "resume": True},
              "probe": {"answer": "record", "eval_resize": None, "task_tokens": "keep"}}
    (tmp_path / "nested.yaml").write_text(yaml.safe_dump(nested))
    a, b = load_config([tmp_path / "flat.yaml"]), load_config([tmp_path / "nested.yaml"])
    assert a == b and a.tasks.names == ["gen", "seg"] and a.probe.task_tokens == "keep" and a.tasks.task_tokens["seg"] == 4
    assert a.optim.learning_rate == 2e-3 and a.run.resume is True and a.probe.eval_resize is None
    # a checkpoint's config of before (flat, every field) and of now (sections) build the same config
    old = {k: getattr(getattr(a, s), n) for k, (s, n) in FLAT.items()}
    assert load_config(recorded=old) == a == load_config(recorded=saved(a))
    # one flat key for each field of each section: the 50 fields of the flat PTConfig of before, with vlora
    every = {(s, f.name) for s in ("model", "data", "tasks", "optim", "run", "probe")
             for f in dataclasses.fields(getattr(PTConfig(), s))} - SECTION_ONLY
    assert sorted(FLAT.values()) == sorted(every) and len(FLAT) + 1 == 50
    # the config.json of a run of olaf before the sections (written by that code: tests/data), every field kept
    before = json.loads((Path(__file__).parent / "data" / "config_before_sections.json").read_text())
    got = load_config(recorded=before)
    assert (got.data.store, got.run.output_dir, got.model.llm, got.optim.learning_rate, got.tasks.names) == \
        ("/stores/ola558k", "runs/pt", "x/llm", 2e-4, ["gen", "seg"])
    assert (got.probe.eval_resize, got.optim.max_grad_norm, got.data.order_mix, got.run.note) == \
        (None, 1.0, 64, "before the sections")
    dotted = load_config([tmp_path / "flat.yaml"], sets=["optim.learning_rate=5e-4", "model.precision=bf16",
                                                           "vlora.vlora_rank=8"])
    assert dotted.optim.learning_rate == 5e-4 and dotted.model.precision == "bf16" and dotted.vlora == {"vlora_rank": 8}
    # each section checks its own values, and names them by their section
    with pytest.raises(ValueError, match="optim.warmup_ratio must be in"):
        load_config([tmp_path / "nested.yaml"], sets=["optim.warmup_ratio=2"])


def test_trains_from_a_store_in_a_bucket(tmp_path, trained, trainer_store, tiny_models, tiny_teachers, seaweedfs):
    """The same store uploaded to S3 (SeaweedFS on loopback): the trainer streams it from s3:// and sees the same
    samples in the same order (step 1, before any update, has the local run's loss to the last bit)."""
    import uuid

    import s3fs

    url = f"s3://{seaweedfs.bucket}/{uuid.uuid4().hex[:8]}/store"
    s3fs.S3FileSystem().put(str(trainer_store), url.removeprefix("s3://"), recursive=True)
    out = tmp_path / "out"
    rc, log = call(trainer, trainer_args(url, tiny_models, tiny_teachers, out, "--max-steps", "2"))
    assert rc == 0, log
    got, local = log_of(out), log_of(trained)
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["loss"] == local[0]["loss"]
    info = json.loads((out / "export" / "config.json").read_text())
    assert info["store"] == url


# ---- the PT model as released --------------------------------------------------------------------------------

class _RefAttention(torch.nn.Module):
    """OLA-VLM's PerceiverAttention as its description reads: LayerNorm keys and latents, q from the latents,
    k and v from [keys; latents], scores scaled by dim_head^-1/4 on each side, softmax in fp32, no mask."""

    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = torch.nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        s = self.dim_head ** -0.25
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1)
        return self.to_out((w @ v).permute(0, 2, 1, 3).reshape(b, n, -1))


class _RefDepthHead(torch.nn.Module):
    """TaskTokenDepthHead: TaskTokenResampler(dim = embedding_dim = LLM width, output 1024), then optionally
    linear_1..3 = Linear -> ReLU -> Linear on the output, the loss on linear_1's."""

    def __init__(self, llm, out, heads, dim_head, ff_mult, depth, intermediate):
        super().__init__()
        self.proj_in = torch.nn.Linear(llm, llm)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([
            _RefAttention(llm, dim_head, heads),
            torch.nn.Sequential(torch.nn.LayerNorm(llm), torch.nn.Linear(llm, int(llm * ff_mult), bias=False),
                                torch.nn.GELU(), torch.nn.Linear(int(llm * ff_mult), llm, bias=False))]) for _ in range(depth))
        self.proj_out, self.norm_out = torch.nn.Linear(llm, out), torch.nn.LayerNorm(out)
        self.intermediate = intermediate
        if intermediate:
            mlp = lambda: torch.nn.Sequential(torch.nn.Linear(out, out), torch.nn.ReLU(), torch.nn.Linear(out, out))  # noqa: E731
            self.linear_1, self.linear_2, self.linear_3 = mlp(), mlp(), mlp()

    def forward(self, x, latents):
        latents, x = self.proj_in(latents), self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        out = self.norm_out(self.proj_out(latents))
        return self.linear_1(out) if self.intermediate else out


@pytest.mark.parametrize("intermediate", [False, True])
def test_the_depth_predictor_is_the_released_head(intermediate):
    from trainer.model import OLAPT  # noqa: F401  (the model builds its depth predictors this way)

    llm, out, heads, dim_head = 48, 16, 4, 8
    torch.manual_seed(0)
    ours = Predictor(llm, out, heads, dim_head, 1, 1, width=llm, intermediate=intermediate)
    ref = _RefDepthHead(llm, out, heads, dim_head, 1, 1, intermediate)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    names = {"blocks": "layers", "norm_keys": "norm1", "norm_latents": "norm2"}
    state = {}
    for k, v in ours.state_dict().items():
        for a, b in names.items():
            k = k.replace(a, b)
        state[k] = v
    ref.load_state_dict(state)  # every tensor has its counterpart, same shape
    keys, latents = torch.randn(2, 30, llm), torch.randn(2, 12, llm)
    mask = torch.ones(2, 30, dtype=torch.bool)
    torch.testing.assert_close(ours(keys, mask, latents), ref(keys, latents), rtol=1e-5, atol=1e-6)
    if intermediate:  # linear_2 and linear_3 never reach the loss: present, frozen
        assert not any(p.requires_grad for p in [*ours.linear_2.parameters(), *ours.linear_3.parameters()])


def test_the_full_size_depth_predictor_has_the_released_parameter_count():
    """Llama-3-8B width 4096, output 1024, 4 heads x 32, ff mult 1, one block, counted from the layer list."""
    H, out, inner = 4096, 1024, 4 * 32
    want = (H * H + H) + (2 * H + 2 * H + H * inner + H * 2 * inner + inner * H) + (2 * H + 2 * H * H) \
        + (H * out + out) + 2 * out
    with torch.device("meta"):
        got = sum(p.numel() for p in Predictor(H, out, 4, 32, 1, 1, width=H).parameters())
        small = sum(p.numel() for p in Predictor(H, out, 4, 32, 1, 1).parameters())  # olaf's earlier head
    assert got == want and got > 5 * small


def test_gradients_are_not_clipped_by_default(tmp_path):
    from trainer.config import load_config
    from trainer.loop import clip_gradients

    cfg = load_config([], {"store": "s", "output_dir": "o"})
    assert cfg.optim.max_grad_norm is None  # the released runs: no clipping
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3e6, 4e6, 0.0])  # a huge gradient
    norm = clip_gradients([p], cfg.optim.max_grad_norm)
    assert norm.item() == pytest.approx(5e6) and p.grad.tolist() == [3e6, 4e6, 0.0]  # reported, left alone
    norm = clip_gradients([p], 1.0)  # the option still works
    assert norm.item() == pytest.approx(5e6) and torch.linalg.vector_norm(p.grad).item() == pytest.approx(1.0, rel=1e-5)


# ---- the PT folder OLA-VLM's IFT continues from ----------------------------------------------------------------

def _resampler_keys(prefix: str, llm: int, dim: int, out: int, heads: int, dim_head: int, ff: float, depth: int):
    """TaskTokenResampler's tensors, from its description: proj_in, `depth` x (PerceiverAttention: norm1, norm2,
    to_q, to_kv, to_out; FeedForward: LayerNorm, Linear, GELU, Linear), proj_out, norm_out."""
    inner, hidden = heads * dim_head, int(dim * ff)
    keys = {f"{prefix}.proj_in.weight": (dim, llm), f"{prefix}.proj_in.bias": (dim,),
            f"{prefix}.proj_out.weight": (out, dim), f"{prefix}.proj_out.bias": (out,),
            f"{prefix}.norm_out.weight": (out,), f"{prefix}.norm_out.bias": (out,)}
    for k in range(depth):
        a, f = f"{prefix}.layers.{k}.0", f"{prefix}.layers.{k}.1"
        keys |= {f"{a}.norm1.weight": (dim,), f"{a}.norm1.bias": (dim,), f"{a}.norm2.weight": (dim,),
                 f"{a}.norm2.bias": (dim,), f"{a}.to_q.weight": (inner, dim), f"{a}.to_kv.weight": (2 * inner, dim),
                 f"{a}.to_out.weight": (dim, inner), f"{f}.0.weight": (dim,), f"{f}.0.bias": (dim,),
                 f"{f}.1.weight": (hidden, dim), f"{f}.3.weight": (dim, hidden)}
    return keys


def test_the_ola_vlm_export_has_their_names_shapes_and_config(trained, tmp_path):
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from trainer.export import main as export

    out = tmp_path / "ola"
    assert export([str(trained), "--format", "ola-vlm", "--out", str(out)]) == 0
    run = json.loads((trained / "config.json").read_text())
    info = json.loads((trained / "export" / "config.json").read_text())
    llm_cfg = LlamaConfig.from_pretrained(run["model"]["llm"])
    H, shapes, p = llm_cfg.hidden_size, info["target_shapes"], run["tasks"]["predictor"]
    # what the folder must hold, derived here from the configs
    want = {}
    with torch.device("meta"):
        want |= {k: tuple(v.shape) for k, v in LlamaForCausalLM(llm_cfg).state_dict().items()}
        want |= {f"model.vision_tower.vision_tower.vision_model.{k}": tuple(v.shape)  # CLIPVisionModel 4.x names
                 for k, v in CLIPVisionModel(CLIPVisionConfig.from_pretrained(run["model"]["vision_tower"])).state_dict().items()}
    mm = info["mm_hidden_size"]
    want |= {"model.mm_projector.0.weight": (H, mm), "model.mm_projector.0.bias": (H,),
             "model.mm_projector.2.weight": (H, H), "model.mm_projector.2.bias": (H,)}
    want |= {"model.special_gen_tokens": (8, H), "model.special_depth_tokens": (576, H),
             "model.special_seg_tokens": (576, H)}
    for t in ("gen", "depth", "seg"):
        want[f"{t}_logit_scale"] = ()
        out_dim = shapes[t][1]
        dim = H if t == "depth" else out_dim  # the released depth head runs at the LLM's width
        for i, _ in enumerate(run["tasks"]["layers"][t]):
            want |= _resampler_keys(f"image_{t}_heads.{i}.projector", H, dim, out_dim, p["heads"], p["dim_head"],
                                    p["ff_mult"], p["depth"])
    got = {}
    index = out / "model.safetensors"
    with safe_open(index, "pt") as f:
        for k in f.keys():  # noqa: SIM118
            got[k] = tuple(f.get_slice(k).get_shape())
        proj = f.get_tensor("model.mm_projector.0.weight")
        head = f.get_tensor("image_depth_heads.1.projector.proj_in.weight")
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    assert got == want
    # the trained values, under their new names
    from safetensors.torch import load_file

    last = load_file(sorted((trained / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors")
    assert torch.equal(proj, last["projector.0.weight"]) and torch.equal(head, last["predictors.depth_20.proj_in.weight"])
    # the fields their loader reads; task_token_format decides how many task tokens IFT inserts
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "ola_llama" and cfg["architectures"] == ["OlaLlavaLlamaForCausalLM"]
    assert cfg["task_token_format"] == "expand_emb" and cfg["num_task_tokens"] == 8 and cfg["aux_mode"] == "gen-depth-seg"
    assert cfg["image_depth"]["depth_layer_indices"] == "8-20" and cfg["image_seg"]["seg_layer_indices"] == "10-18"
    assert cfg["image_gen"]["img_layer_indices"] == "12-20" and cfg["image_depth"]["num_tokens"] == 576
    assert cfg["image_depth"]["use_intermediate_depth"] is False and cfg["image_seg"]["output_dim"] == shapes["seg"][1]
    assert cfg["mm_vision_tower"] == run["model"]["vision_tower"] and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["mm_vision_select_layer"] == -2 and cfg["mm_hidden_size"] == mm
    # the LLM part loads with plain transformers, nothing missing (their loader would make it up)
    _, loading = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["mismatched_keys"]


def test_a_pad_token_is_added_as_their_pt_does(tiny_models):
    """Llama-3 has no pad token; their PT adds one whose input and output embeddings are the mean of the
    others (so the vocabulary grows by one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.build import add_pad_token

    folder = Path(tiny_models).parent / "llm"
    tok, llm = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    tok.pad_token = None  # as Llama-3's
    before_in = llm.get_input_embeddings().weight.detach().clone()
    before_out = llm.get_output_embeddings().weight.detach().clone()
    pad = add_pad_token(tok, llm, token="<olaf-test-pad>")
    assert pad == len(before_in) and len(tok) == len(before_in) + 1
    assert llm.get_input_embeddings().weight.shape[0] == len(before_in) + 1
    torch.testing.assert_close(llm.get_input_embeddings().weight[pad], before_in.mean(dim=0))
    torch.testing.assert_close(llm.get_output_embeddings().weight[pad], before_out.mean(dim=0))
    torch.testing.assert_close(llm.get_input_embeddings().weight[:pad], before_in)


def test_the_original_ntp_labels_are_a_switch(tiny_models, tmp_path):
    """`ntp_labels: original` labels one more token than the corrected default: the instruction's last, the end
    of the assistant header (the original's off-by-one); the run config records the choice."""
    from transformers import AutoTokenizer

    from trainer.config import load_config

    tok = AutoTokenizer.from_pretrained(Path(tiny_models).parent / "llm")
    t = TEMPLATES["llama_3"]
    record = {"conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                {"from": "gpt", "value": "a red square"}]}
    corrected = PromptBuilder(tok, t, 4096)(record)
    original = PromptBuilder(tok, t, 4096, label_header_end=True)(record)
    assert original.text_ids == corrected.text_ids
    diff = [i for i, (a, b) in enumerate(zip(corrected.text_labels, original.text_labels, strict=True)) if a != b]
    first_caption = next(i for i, x in enumerate(corrected.text_labels) if x != -100)
    assert diff == [first_caption - 1]  # just before the caption
    assert t.assistant_start.endswith(tok.decode([original.text_labels[diff[0]]]))
    cfg = load_config([], {"store": "s", "output_dir": "o"})
    assert cfg.model.ntp_labels == "corrected"
    assert load_config([], {"store": "s", "output_dir": "o"}, ["ntp_labels=original"]).model.ntp_labels == "original"
    with pytest.raises(ValueError, match="preprocess_llama_3"):
        load_config([], {"store": "s", "output_dir": "o"}, ["ntp_labels=original", "chat_template=phi_3"])


# ---- CLIP-ConvNeXT-XXL, the paper's best base encoder ----------------------------------------------------------

def _timm_convnext_reference(state: dict, x: torch.Tensor, eps: float) -> torch.Tensor:
    """timm's ConvNeXt trunk written out from its tensor names: stem conv 4/4 + LayerNorm2d; per stage an optional
    downsample (LayerNorm2d + conv 2/2) and blocks x + gamma * fc2(gelu(fc1(norm(dwconv7(x))))); tokens row-major."""
    import torch.nn.functional as F

    def ln2d(t, w, b):
        return F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], w, b, eps).permute(0, 3, 1, 2)

    t = state
    x = F.conv2d(x, t["stem.0.weight"], t["stem.0.bias"], stride=4)
    x = ln2d(x, t["stem.1.weight"], t["stem.1.bias"])
    stage = 0
    while f"stages.{stage}.blocks.0.conv_dw.weight" in t:
        p = f"stages.{stage}"
        if f"{p}.downsample.0.weight" in t:
            x = ln2d(x, t[f"{p}.downsample.0.weight"], t[f"{p}.downsample.0.bias"])
            x = F.conv2d(x, t[f"{p}.downsample.1.weight"], t[f"{p}.downsample.1.bias"], stride=2)
        block = 0
        while f"{p}.blocks.{block}.conv_dw.weight" in t:
            q = f"{p}.blocks.{block}"
            y = F.conv2d(x, t[f"{q}.conv_dw.weight"], t[f"{q}.conv_dw.bias"], padding=3, groups=x.shape[1])
            y = F.layer_norm(y.permute(0, 2, 3, 1), x.shape[1:2], t[f"{q}.norm.weight"], t[f"{q}.norm.bias"], eps)
            y = F.linear(F.gelu(F.linear(y, t[f"{q}.mlp.fc1.weight"], t[f"{q}.mlp.fc1.bias"])),
                         t[f"{q}.mlp.fc2.weight"], t[f"{q}.mlp.fc2.bias"])
            x = x + (t[f"{q}.gamma"] * y).permute(0, 3, 1, 2)
            block += 1
        stage += 1
    return x.flatten(2).transpose(1, 2)


def test_the_convnext_tower_is_the_open_clip_trunk(tmp_path):
    from safetensors.torch import load_file

    from trainer.data import ImageRecipe
    from trainer.tiny import build_convnext_tower
    from trainer.towers import load_tower, split_convnext_name

    name = build_convnext_tower(tmp_path / "convnext")
    assert split_convnext_name(name) == (str((tmp_path / "convnext").resolve()), 768)
    assert split_convnext_name("laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768") == \
        ("laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup", 768)
    tower = load_tower(name, -2, torch.float32)
    assert tower.num_tokens == 576 and tower.hidden_size == 32  # 768 / 32 = 24 x 24 tokens, the last stage's width
    timm = {k[len("visual.trunk."):]: v for k, v in load_file(tmp_path / "convnext" / "open_clip_model.safetensors").items()
            if k.startswith("visual.trunk.")}
    x = torch.randn(2, 3, 768, 768)
    got = tower.features(x)
    assert got.shape == (2, 576, 32)
    torch.testing.assert_close(got, _timm_convnext_reference(timm, x, 1e-5), rtol=1e-4, atol=1e-4)
    assert set(tower.export_state()) == set(timm)  # exported under the trunk's own (timm) names
    # open_clip's preprocessing: Resize(768) bicubic, CenterCrop(768) with torchvision's rounding of the margin
    recipe = ImageRecipe.from_pretrained(name, "square")
    assert (recipe.size, recipe.crop, recipe.resample, recipe.crop_rounding) == (768, 768, "bicubic", "half_even")
    from PIL import Image

    from recipes.imageops import center_crop

    img = Image.fromarray(np.arange(5 * 8, dtype=np.uint8).reshape(5, 8))
    assert np.asarray(center_crop(img, 5, 5, "half_even"))[0, 0] == 2  # round(1.5) = 2 (torchvision)
    assert np.asarray(center_crop(img, 5, 5))[0, 0] == 1  # (8 - 5) // 2 = 1 (transformers)


def test_convnext_xxl_tiny_trains_end_to_end(tmp_path, trainer_store, tiny_models, tiny_teachers):
    from trainer.tiny import build_convnext_tower

    name = build_convnext_tower(tmp_path / "convnext")
    out = tmp_path / "out"
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--vision-tower", name,
                                         "--max-steps", "2", "--set", "num_workers=1",
                                         "--set", "gradient_checkpointing=true"))
    assert rc == 0, log
    assert [r["step"] for r in log_of(out)] == [1, 2] and all(math.isfinite(r["loss"]) for r in log_of(out))
    info = json.loads((out / "export" / "config.json").read_text())
    assert info["mm_hidden_size"] == 32 and info["num_image_tokens"] == 576 and info["vision_tower"] == name


def open_clip_convnext_xxlarge_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup(-res768)'s open_clip checkpoint,
    written out from the model definitions: open_clip's convnext_xxlarge.json (embed 1024; vision: timm
    convnext_xxlarge, pool '', proj linear without bias; text: width 1024, 16 heads, 24 layers, vocab 49408, context
    77) and timm's ConvNeXt (stem conv 4/4 + norm; stages of [norm + conv 2/2 downsample from stage 1] and blocks
    of gamma, dwconv 7, norm, mlp 4x; reset_classifier(0, '') keeps head.norm)."""
    dims, depths = [384, 768, 1536, 3072], [3, 4, 30, 3]
    keys = {"visual.trunk.stem.0.weight": (384, 3, 4, 4), "visual.trunk.stem.0.bias": (384,),
            "visual.trunk.stem.1.weight": (384,), "visual.trunk.stem.1.bias": (384,)}
    for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
        s = f"visual.trunk.stages.{i}"
        if i:
            keys |= {f"{s}.downsample.0.weight": (dims[i - 1],), f"{s}.downsample.0.bias": (dims[i - 1],),
                     f"{s}.downsample.1.weight": (d, dims[i - 1], 2, 2), f"{s}.downsample.1.bias": (d,)}
        for j in range(n):
            b = f"{s}.blocks.{j}"
            keys |= {f"{b}.gamma": (d,), f"{b}.conv_dw.weight": (d, 1, 7, 7), f"{b}.conv_dw.bias": (d,),
                     f"{b}.norm.weight": (d,), f"{b}.norm.bias": (d,), f"{b}.mlp.fc1.weight": (4 * d, d),
                     f"{b}.mlp.fc1.bias": (4 * d,), f"{b}.mlp.fc2.weight": (d, 4 * d), f"{b}.mlp.fc2.bias": (d,)}
    keys |= {"visual.trunk.head.norm.weight": (3072,), "visual.trunk.head.norm.bias": (3072,),
             "visual.head.proj.weight": (1024, 3072)}
    w = 1024
    keys |= {"positional_embedding": (77, w), "text_projection": (w, 1024), "token_embedding.weight": (49408, w),
             "ln_final.weight": (w,), "ln_final.bias": (w,), "logit_scale": ()}
    for j in range(24):
        r = f"transformer.resblocks.{j}"
        keys |= {f"{r}.ln_1.weight": (w,), f"{r}.ln_1.bias": (w,), f"{r}.attn.in_proj_weight": (3 * w, w),
                 f"{r}.attn.in_proj_bias": (3 * w,), f"{r}.attn.out_proj.weight": (w, w),
                 f"{r}.attn.out_proj.bias": (w,), f"{r}.ln_2.weight": (w,), f"{r}.ln_2.bias": (w,),
                 f"{r}.mlp.c_fc.weight": (4 * w, w), f"{r}.mlp.c_fc.bias": (4 * w,),
                 f"{r}.mlp.c_proj.weight": (w, 4 * w), f"{r}.mlp.c_proj.bias": (w,)}
    return keys


def test_the_full_size_convnext_xxl_checkpoint_loads_with_every_tensor_accounted_for():
    """The real checkpoint's complete key set (meta tensors): every trunk tensor lands in the tower with its shape,
    head.norm is kept for export, the projection and text tower are set aside with a reason, and a tensor olaf
    does not know is refused by name."""
    from trainer.towers import account_convnext, convnext_from_state

    keys = open_clip_convnext_xxlarge_keys()
    trunk_keys = {k for k in keys if k.startswith("visual.trunk.")}
    # timm 1.0.8's convnext_xxlarge after reset_classifier(0, global_pool=''): 378 tensors, 843,398,016 values
    assert len(trunk_keys) == 378 and sum(math.prod(keys[k]) for k in trunk_keys) == 843_398_016
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    config = {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_xxlarge"}}}
    tower = convnext_from_state(state, config, 768, torch.bfloat16)
    assert (tower.hidden_size, tower.num_tokens) == (3072, 576)
    loaded = {n: tuple(p.shape) for n, p in tower.model.state_dict().items()}
    assert sum(math.prod(s) for s in loaded.values()) == 843_398_016 - 2 * 3072  # all but head.norm
    exported = {k: tuple(v.shape) for k, v in tower.export_state().items()}
    assert exported == {k[len("visual.trunk."):]: keys[k] for k in trunk_keys}  # back under timm's names, whole
    _, head_norm, unused = account_convnext(state)
    assert set(head_norm) == {"weight", "bias"}
    assert set(unused) == set(keys) - trunk_keys and all(unused.values())
    with pytest.raises(KeyError, match="visual.trunk.stages.0.blocks.0.extra"):
        account_convnext({**state, "visual.trunk.stages.0.blocks.0.extra": torch.empty(1, device="meta")})
    with pytest.raises(KeyError, match="visual.attnpool.weight"):
        account_convnext({**state, "visual.attnpool.weight": torch.empty(1, device="meta")})
    bad = {**state, "visual.trunk.stages.3.blocks.0.gamma": torch.empty(7, device="meta")}
    with pytest.raises(ValueError, match="gamma|layer_scale"):
        convnext_from_state(bad, config, 768, torch.bfloat16)


# ---- the LLaVA-1.5 baseline: tasks: [] -------------------------------------------------------------------------

def test_the_ntp_only_baseline_trains_exports_and_its_loss_is_the_llm_s_own(tmp_path, trainer_store, tiny_models,
                                                                          tiny_teachers):
    """`tasks: []` is LLaVA-1.5's PT (the paper's baseline): projector only, NTP only; both exports; its loss on a
    batch is what the LLM's own labels-based loss gives for [prefix | projected image | text]."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainer.build import build
    from trainer.config import load_config
    from trainer.export import main as export

    out = tmp_path / "baseline"
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "2",
                                         "--set", "tasks=[]", "--set", "num_workers=0"))
    assert rc == 0, log
    records = log_of(out)
    assert [r["step"] for r in records] == [1, 2] and all(set(r) & {"gen", "depth", "seg"} == set() for r in records)
    assert all(r["loss"] == pytest.approx(r["ntp"]) for r in records)
    trained_names = set(load_file(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    assert trained_names == {"projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    assert export([str(out), "--format", "ola-vlm", "--out", str(tmp_path / "ola")]) == 0
    cfg_out = json.loads((tmp_path / "ola" / "config.json").read_text())
    assert cfg_out["model_type"] == "llava_llama" and cfg_out["architectures"] == ["LlavaLlamaForCausalLM"]
    assert "aux_mode" not in cfg_out and "num_task_tokens" not in cfg_out
    assert export([str(out), "--format", "llava", "--out", str(tmp_path / "llava")]) == 0
    assert (tmp_path / "llava" / "mm_projector.bin").is_file()
    # the loss is the LLM's own
    cfg = load_config([tiny_models], {"store": str(trainer_store), "output_dir": str(tmp_path / "o"), "tasks": "[]",
                                      "teachers_manifest": str(tiny_teachers)}, ["num_workers=0"])
    run = build(cfg, torch.device("cpu"), torch.float32)
    batch = next(iter(run.stream))
    with torch.no_grad():
        loss, terms = run.model(batch)
        m = run.model
        embeds = torch.cat([m.embed(batch["prefix_ids"]), m.image_tokens(batch["pixels"]), m.embed(batch["text_ids"])], 1)
        n_fixed = batch["prefix_ids"].shape[1] + m.layout.image
        labels = torch.cat([torch.full((embeds.shape[0], n_fixed), -100), batch["text_labels"]], 1)
        mask = torch.cat([torch.ones(embeds.shape[0], n_fixed, dtype=torch.long), batch["text_mask"]], 1)
        llm = AutoModelForCausalLM.from_pretrained(cfg.model.llm, dtype=torch.float32)
        want = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"ntp", "loss"}

"""Held-out losses while training (`--eval-store --eval-every --eval-samples`, trainer/evaluate.py): logs/eval.jsonl
against a separate forward of the same samples, whose loss terms this test computes itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import call, trainer_args
from safetensors.torch import load_file
from test_trainer import ref_infonce, ref_smooth_l1

from store import GlobalOrder, Store
from trainer.build import build
from trainer.config import load_config, without_resume
from trainer.pt import run as trainer

K, MICRO = 6, 4  # two held-out micro-batches: 4 samples and 2


def reference_figures(run, step_dir, cfg) -> dict:
    """The checkpoint's model on the first K samples of the eval store's order (the run's seed, chunk and mix),
    every term computed here: per micro-batch of MICRO in position order, InfoNCE over that micro-batch's own
    valid targets, then the mean over the micro-batches."""
    own = dict(run.model.named_parameters())
    with torch.no_grad():
        for k, v in load_file(step_dir / "trainable.safetensors").items():
            own[k].copy_(v)
    ev = Store(cfg.data.eval_store)
    order = GlobalOrder(ev.sample_table(cfg.tasks.names), cfg.optim.seed, cfg.data.order_chunk, cfg.data.order_mix)
    want_ids = [ev.index.ids[int(r)] for r in order.rows(0, K)]
    per_batch = []
    for a in range(0, K, MICRO):
        batch = run.held_out.stream.batch_of(a, min(a + MICRO, K))
        assert list(batch["ids"]) == want_ids[a:a + MICRO]
        with torch.no_grad():
            ntp, preds = run.model.predict(batch)
        terms = {"ntp": float(ntp)}
        total = float(ntp)
        for t in cfg.tasks.names:
            tgt, valid = batch["targets"][t].float().numpy(), batch["valid"][t].numpy()
            task_sum = 0.0
            for layer, p in preds[t].items():
                sl1 = ref_smooth_l1(p.numpy(), tgt, valid)
                nce = ref_infonce(p.numpy(), tgt, valid, valid, float(run.model.logit_scales[t]), 0)
                terms[f"{t}/{layer}/sl1"], terms[f"{t}/{layer}/nce"] = sl1, nce
                task_sum += sl1 + cfg.tasks.contrastive_weight * nce
            terms[t] = cfg.tasks.task_loss_weight * task_sum
            total += terms[t]
        terms["loss"] = total
        per_batch.append(terms)
    return {k: float(np.mean([b[k] for b in per_batch])) for k in per_batch[0]}


def test_the_held_out_losses_are_a_separate_forward_of_the_same_samples(tmp_path, trainer_store, tiny_models,
                                                                        tiny_teachers):
    out = tmp_path / "out"
    argv = trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "4", "--eval-store",
                        trainer_store, "--eval-every", "2", "--eval-samples", str(K), "--set", "num_workers=0")
    rc, log = call(trainer, argv)
    assert rc == 0, log
    assert f"held-out: {K} samples" in log
    records = [json.loads(x) for x in (out / "logs" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["samples"] == K for r in records)
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    cfg = load_config(recorded=without_resume(state["config"]))
    run = build(cfg, torch.device("cpu"), torch.float32)
    for rec in records:
        want = reference_figures(run, out / "checkpoints" / f"step-{rec['step']:06d}", cfg)
        assert set(want) <= set(rec)
        for k, v in want.items():
            assert rec[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (rec["step"], k)
    assert records[0]["loss"] != records[1]["loss"]  # the model moved between them


def test_eval_store_and_eval_every_go_together(tmp_path, trainer_store, tiny_models, tiny_teachers):
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "o", "--eval-every", "2"))
    assert rc == 2 and "go together" in log

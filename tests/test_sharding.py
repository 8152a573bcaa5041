"""Sharded trained state (`model.sharding: fsdp`, trainer/sharding.py) on 2 gloo ranks: the losses of DDP for
OLA-VLM PT and VLoRA, the trained state per rank halved, and checkpoints that move between fsdp and none. The
multi-process runs are the slow tier; the arithmetic is not."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from helpers import REPO, call, env, trainer_args
from test_vlora import vlora_args

from trainer.pt import run as trainer
from trainer.sharding import trained_state_bytes


def log_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]


def ids_of(out: Path) -> list[list[str]]:
    return [json.loads(x)["ids"] for x in (out / "logs" / "samples.jsonl").read_text().splitlines()]


def torchrun(argv: list[str], nproc: int = 2) -> str:
    """`torchrun --nproc_per_node N -m trainer.pt ARGV` on loopback (gloo); its output, the run asserted to pass."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer.pt", *argv]
    p = subprocess.run(cmd, cwd=REPO, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def same_losses(a: Path, b: Path, tol: float = 1e-5) -> None:
    ra, rb = log_of(a), log_of(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb, strict=True):
        for k, v in x.items():
            if not k.endswith("_per_s"):
                assert y[k] == pytest.approx(v, rel=tol, abs=tol), (x["step"], k, v, y[k])
    assert ids_of(a) == ids_of(b)
    evals = [[json.loads(x) for x in (run / "logs" / "eval.jsonl").read_text().splitlines()]
             if (run / "logs" / "eval.jsonl").exists() else [] for run in (a, b)]
    assert len(evals[0]) == len(evals[1])
    for x, y in zip(*evals, strict=True):  # held-out figures: the same whatever the ranks and sharding
        assert x.keys() == y.keys() and all(y[k] == pytest.approx(v, rel=tol, abs=tol) for k, v in x.items())


def state_line(log: str) -> int:
    return int(re.search(r"trained state per rank: ([\d,]+) bytes", log).group(1).replace(",", ""))


def back_to_step(run: Path, copy: Path, step: int) -> Path:
    """A copy of a finished run as a run killed after its checkpoint `step` would be: later checkpoints and the
    export gone (resume drops the logs after the checkpoint)."""
    shutil.copytree(run, copy)
    for ck in (copy / "checkpoints").iterdir():
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    shutil.rmtree(copy / "export", ignore_errors=True)
    return copy


def test_the_trained_state_bytes_count_parameters_gradients_and_both_moments():
    """One process: every trained tensor whole; a frozen predictor part counts as a parameter only."""
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = torch.nn.Linear(3, 5)  # 20 trained
            self.predictors = torch.nn.ModuleDict({"gen_1": torch.nn.Linear(2, 2)})  # 6: 4 frozen, 2 trained
            self.predictors["gen_1"].weight.requires_grad_(False)
            self.frozen = torch.nn.Linear(7, 7).requires_grad_(False)  # 56, not trained state

    got = trained_state_bytes(Toy())
    assert got == {"parameters": 26 * 4, "gradients": 22 * 4, "optimizer": 44 * 4, "total": (26 + 22 + 44) * 4}


@pytest.mark.slow
def test_fsdp_gives_ddp_s_losses_halves_the_state_and_resumes_across_shardings(tmp_path, trainer_store, tiny_models,
                                                                               tiny_teachers):
    def argv(out, sharding, *extra):
        return trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "4",
                            "--set", "global_batch_size=8", "--set", "num_workers=1", "--set", "save_every=2",
                            "--set", "log_every=1", "--set", f"model.sharding={sharding}", "--eval-store",
                            trainer_store, "--eval-every", "2", "--eval-samples", "10", *extra)

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    ddp_log, fsdp_log = torchrun(argv(ddp, "none")), torchrun(argv(fsdp, "fsdp"))
    same_losses(ddp, fsdp)
    assert [json.loads(x)["step"] for x in (fsdp / "logs" / "eval.jsonl").read_text().splitlines()] == [2, 4]
    whole, shard = state_line(ddp_log), state_line(fsdp_log)
    assert "sharding fsdp over 2 ranks" in fsdp_log and "whole on every rank" in ddp_log
    assert whole / 2 <= shard <= whole / 2 + 4096, (whole, shard)  # halves, up to the uneven split's padding
    # the same checkpoint files: fsdp on 2 -> none on 1, and none on 1 -> fsdp on 2
    one = tmp_path / "one"
    rc, log = call(trainer, argv(one, "none"))
    assert rc == 0, log
    same_losses(one, ddp)
    cont = back_to_step(fsdp, tmp_path / "fsdp-then-none", 2)
    rc, log = call(trainer, argv(cont, "none", "--resume"))
    assert rc == 0 and "resumed from" in log, log
    same_losses(one, cont)
    cont = back_to_step(one, tmp_path / "none-then-fsdp", 2)
    log = torchrun(argv(cont, "fsdp", "--resume"))
    assert "resumed from" in log
    same_losses(one, cont)


@pytest.mark.slow
def test_vlora_under_fsdp_gives_ddp_s_losses(tmp_path, trainer_store, tiny_models, tiny_teachers):
    def argv(out, sharding):
        return vlora_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "3",
                          "--set", f"model.sharding={sharding}")

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    whole, shard = state_line(torchrun(argv(ddp, "none"))), state_line(torchrun(argv(fsdp, "fsdp")))
    same_losses(ddp, fsdp)
    assert whole / 2 <= shard <= whole / 2 + 4096, (whole, shard)

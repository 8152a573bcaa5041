"""The record a proof writes and the clock its parts run against: each part's share of the time, the check between
two figures, the alarm inside one, the JSON rewritten after every figure, the signals recorded."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import signal
import threading
import time
import traceback
from pathlib import Path

import torch

from store.fs import atomic_write, refuse_inside_store

SCHEMA = "olaf-gpu-proof/1"
RESERVE_S = 10.0  # kept back from the parts for the table and the last write


class OverBudget(Exception):
    """A part's time is up: raised between two figures, or by the alarm inside one."""


class Proof:
    """The JSON being written (`data`, saved after every figure) and the clock the parts run against."""

    def __init__(self, path: Path, minutes: float, mode: str, clock=time.monotonic, hard_stop: bool = True):
        self.path, self.clock, self.hard_stop = Path(path), clock, hard_stop
        self.end = clock() + 60.0 * minutes
        self.part_end = self.end
        self.current: str | None = None
        # when the alarm stops a part that overran its budget: a little later, never after the run's end
        self.grace = lambda budget: min(1.25 * budget + 20, max(budget, self.end - self.clock() - RESERVE_S / 2))
        self.data = {"schema": SCHEMA, "mode": mode, "minutes": minutes, "started": now(), "finished": None,
                     "interrupted": None, "env": {}, "parts": {}}

    def save(self) -> None:
        atomic_write(self.path, (json.dumps(self.data, indent=1, default=str) + "\n").encode())

    def put(self, key: str, value) -> None:
        """A figure of the current part, saved at once."""
        self.data["parts"][self.current][key] = value
        self.save()

    def left(self) -> float:
        return self.part_end - self.clock()

    def check(self, what: str) -> None:
        """Before measuring `what`: stop the part if its time is up."""
        if self.left() <= 0:
            raise OverBudget(what)

    def run(self, parts: dict, weights: dict) -> None:
        """Each part with its share of the time left (the shares of the parts still to run, renormalised)."""
        names = list(parts)
        for i, name in enumerate(names):
            share = weights[name] / sum(weights[n] for n in names[i:])
            self.run_part(name, parts[name], max(0.0, self.end - RESERVE_S - self.clock()) * share)

    def run_part(self, name: str, fn, budget: float) -> None:
        self.current = name
        entry = self.data["parts"][name] = {"status": "running", "budget_s": round(budget, 1)}
        self.part_end, t0 = self.clock() + budget, self.clock()
        self.save()
        try:
            with _alarm(self.grace(budget) if self.hard_stop else None):
                fn(self)
            entry["status"] = "done"
        except OverBudget as e:
            entry["status"], entry["stopped_before"] = "budget", str(e)
        except Exception as e:  # one part's failure is recorded; the others still run
            entry["status"], entry["error"] = "error", f"{type(e).__name__}: {str(e)[:500]}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        finally:
            entry["seconds"] = round(self.clock() - t0, 1)
            self.save()
            free()

    def interrupted(self, signum, frame) -> None:
        self.data["interrupted"] = f"{signal.Signals(signum).name} during {self.current or 'set-up'}"
        self.save()
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def _alarm(seconds: float | None):
    """OverBudget inside the block after `seconds` (SIGALRM; the main thread only)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise OverBudget("the alarm: a figure ran past the part's time")

    before = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """a / b, or None where a figure is missing (out of memory)."""
    return round(a / b, digits) if a and b else None


def fits(fn):
    """fn(), or None when it ran out of GPU memory (the part goes on with its next figure)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        free()
        return None


def result_path(out: Path) -> Path:
    """Where this run's JSON goes: OUT/gpu_proof.json, or beside an earlier one (on a lease it may be the only copy
    of figures measured), never over it."""
    refuse_inside_store(out, "--out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder (the JSON goes in it)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_proof.json"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        if not path.exists():
            break
        path = out / f"gpu_proof-{stamp}{f'-{n}' if n else ''}.json"
    if path.name != "gpu_proof.json":
        print(f"note: {out / 'gpu_proof.json'} is kept; this run writes {path}")
    return path

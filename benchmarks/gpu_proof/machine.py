"""The machine a proof ran on (GPU, driver, CUDA, torch, every library, olaf's code version) and the node's busy CPU
cores while a job runs."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
from pathlib import Path

import torch

from benchmarks.gpu_proof.setup import Setup

LIBRARIES = ("transformers", "ray", "zarr", "numcodecs", "webdataset", "fsspec", "safetensors", "numpy", "flash-attn",
             "diffusers")


def environment(s: Setup) -> dict:
    """The machine, the driver and every library a figure depends on (read from the installed metadata: a missing
    one is null, and only the parts that need it fail), and olaf's code version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from pipeline.provenance import code_version
    from recipes.imageops import image_libraries

    libs = {"python": platform.python_version(), "torch": torch.__version__, **image_libraries()}
    for name in LIBRARIES:
        try:
            libs[name] = installed(name)
        except PackageNotFoundError:
            libs[name] = None
    env = {"device": str(s.device), "torch": torch.__version__, "cuda": torch.version.cuda, "libraries": libs,
           "code": code_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "peak_tflops": s.peak_tflops, "gpu": None, "driver": None}
    if s.cuda:
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = _nvidia_smi("driver_version")
        env["gpu"]["max_sm_clock_mhz"] = _nvidia_smi("clocks.max.sm")
        env["gpu"]["power_limit_w"] = _nvidia_smi("power.limit")
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


class CoreSampler:
    """Busy CPU cores of the whole node (user + system + irq time, all processes), sampled once a second."""

    def __enter__(self):
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @staticmethod
    def _jiffies() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    def _run(self) -> None:
        hz, last = os.sysconf("SC_CLK_TCK"), self._jiffies()
        while last is not None and not self.stop.wait(1.0):
            now = self._jiffies()
            busy = now[0] - last[0]
            total = now[1] - last[1]
            if total:
                self.samples.append(round(busy / hz / (total / hz / (os.cpu_count() or 1)), 2))
            last = now

    def summary(self) -> dict:
        x = self.samples
        return {"per_second": x, "median": statistics.median(x) if x else None, "max": max(x) if x else None}

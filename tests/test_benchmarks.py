"""Every benchmark command docs/benchmarks.md documents runs here at a tiny size and prints its table: a
documented command that no longer runs (`extract.py --shape-true` raised a TypeError for a release) fails the
suite. The figures themselves are not asserted: they are timings."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, env


def bench(*argv: str, timeout: int = 300) -> str:
    p = subprocess.run([sys.executable, *argv], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_the_data_path_at_real_sizes(tmp_path):
    out = bench("benchmarks/extract.py", "--shape-true", "--samples", "4", "--shard-size", "2", "--work-dir",
                str(tmp_path))
    rows = {line.split("  ")[0].strip() for line in out.splitlines()}
    for stage in ("decode (JPEG -> RGB)", "write zarr (local disk)", "write wds (local disk)", "verify wds (sha256)",
                  "end to end, --resize-on device"):
        assert stage in rows, out
    targets = (1 * 1024 + 576 * 1024 + 576 * 1536) * 2  # the three real target shapes in fp16
    assert f"bytes per sample: zarr {targets / 1e6:.2f} MB" in out, out

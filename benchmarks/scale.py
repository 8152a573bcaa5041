"""olaf at the sizes its users run: LLaVA-558K, 3M, VLoRA's 30M pairs, on synthetic stores (no data needed).

    python -m benchmarks.scale [--sizes 558128,3000000,30000000] [--work-dir DIR] [--ranks 2] [--workers 2]

Per size, side by side where there is a before and an after:
  plan        `extract_teachers`' plan of a LLaVA JSON (up to 3M) and of a JSONL listing of that many records
              (time, peak memory of the process)
  index       building the store's sample index from the records, and its size on disk
  start-up    a trainer's stream, from opening the store to its first micro-batch in hand (DataLoader workers
              running): `--ranks` ranks at once on this node, each with `--workers` workers; the node's memory
              for the store (every process's anonymous memory beyond what it holds for a store of 2,560 samples,
              a forked worker's pages shared with its rank counted twice, plus the mapped index and order files
              once), per sample, and each process's RSS; with the index (what the trainer does) and, up to 3M,
              from the records (what it did before)
  resume      from a position near the end of the second epoch to that micro-batch in hand
  summary     `inspect STORE summary` (reads every record)
Each figure's growth with the store (O(N) or O(1)) is in docs/benchmarks.md. The stores are sparse: a shard's
tar has its recorded size, and only the samples read are written (support/synthetic.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from support.synthetic import synthetic_store

REPO = Path(__file__).resolve().parents[1]
SHARD, GLOBAL, MICRO, SEED = 256, 256, 32, 42
STEPS = 4  # global batches a rank reads before its memory is taken: its workers are past their start
RECORDS_UP_TO = 3_000_000  # above it, starting from the records costs more than this machine's 24 GB
BASE = 2_560  # ten shards: what the processes take whatever the store (the interpreter, torch)


def memory(pid: int) -> dict:
    """A process's RSS and its anonymous memory (heap, arrays, Python objects: what it holds of its own, a page a
    forked worker still shares with its rank counted in both) in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("Rss", "Anonymous"):
            out[key.lower()[:4]] = int(line.split()[1]) * 1024
    return out


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rank_main(url: str, rank: int, world: int, workers: int, resume_at: int, ready: str) -> None:
    """One rank: the stream to its first micro-batch (timed), its processes' memory then, and a resume (timed)."""
    import store

    t0 = time.perf_counter()
    stream = store.TargetStream(url, ["gen"], global_batch=GLOBAL, micro_batch=MICRO, seed=SEED, rank=rank,
                                world_size=world)
    it = store.loader(stream, num_workers=workers)
    first = next(it)
    start_s = time.perf_counter() - t0
    for _ in range(STEPS * stream.accum - 1):
        next(it)
    Path(ready).write_text("ready")  # the parent samples the memory of this rank and its workers now
    while Path(ready).read_text() != "measured":
        time.sleep(0.05)
    del it
    t0 = time.perf_counter()
    again = store.TargetStream(url, ["gen"], global_batch=GLOBAL, micro_batch=MICRO, seed=SEED, rank=rank,
                               world_size=world)
    again.load_state_dict({**again.state_dict(), "position": resume_at})
    after = next(iter(again))
    resume_s = time.perf_counter() - t0
    print(json.dumps({"start_s": start_s, "resume_s": resume_s, "first": first["positions"],
                      "resumed": after["positions"], "index": stream.store.index is not None}))


def materialize_reads(url: str, world: int, resume_at: int) -> None:
    """Write the samples the ranks read (their first STEPS global batches, and one at the resume position)."""
    import store
    from support.synthetic import materialize

    s = store.TargetStream(url, ["gen"], global_batch=GLOBAL, micro_batch=MICRO, seed=SEED)
    rows = [s.order.rows(0, (STEPS + 1) * GLOBAL), s.order.rows(resume_at, resume_at + GLOBAL)]
    materialize(url, [int(s.table.index[r]) for part in rows for r in part], SHARD)


def start_up(url: str, ranks: int, workers: int, resume_at: int, work: Path) -> dict:
    """`ranks` rank processes at once; their and their workers' memory once every rank holds its first batch."""
    procs, flags = [], []
    for r in range(ranks):
        flag = work / f"ready-{r}"
        flag.write_text("")
        flags.append(flag)
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--rank", str(r), "--world",
                                       str(ranks), "--workers", str(workers), "--url", url, "--resume-at",
                                       str(resume_at), "--ready", str(flag)], cwd=REPO, stdout=subprocess.PIPE,
                                      text=True))
    while not all(f.read_text() == "ready" for f in flags):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a rank exited before its first batch")
        time.sleep(0.05)
    mains = [memory(p.pid) for p in procs]
    kids = [memory(c) for p in procs for c in children(p.pid)]
    mapped = folder_bytes(Path(url) / "index") + folder_bytes(Path(os.environ["OLAF_CACHE"]) / "order")
    for f in flags:
        f.write_text("measured")
    runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    shutil.rmtree(Path(os.environ["OLAF_CACHE"]) / "order", ignore_errors=True)
    return {"start_s": max(r["start_s"] for r in runs), "resume_s": max(r["resume_s"] for r in runs),
            "index": runs[0]["index"], "anon": sum(m["anon"] for m in mains + kids), "mapped": mapped,
            "rank_rss": max(m["rss"] for m in mains), "worker_rss": max((m["rss"] for m in kids), default=0)}


# a process's own peak resident memory in bytes, as Python code it runs: VmHWM of /proc/self/status
OWN_PEAK = "int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1]) * 1024"


def plan_row(n: int, work: Path, kind: str) -> dict:
    """make_plan of a LLaVA JSON (`kind` json) or a JSONL listing (jsonl) of n records, in a process of its own,
    whose peak memory is its own: VmHWM, which exec resets (ru_maxrss is carried across exec from the forked image:
    with this process holding gigabytes at 30M, a child's ru_maxrss said 3,679 MB for a 530 MB plan)."""
    data = work / f"plan.{kind}"
    conv = [{"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": "a photograph of something"}]
    with open(data, "w") as f:
        f.write("[" if kind == "json" else "")
        for j in range(n):
            line = json.dumps({"id": f"{j:09d}", "image": f"{j // 10000:05d}/{j:09d}.jpg", "conversations": conv})
            f.write(("," if j else "") + line if kind == "json" else line + "\n")
        f.write("]" if kind == "json" else "")
    code = ("import time; from pipeline.extract.plan import make_plan; t = time.perf_counter(); "
            f"p = make_plan({str(data)!r}, {str(work)!r}, {SHARD}); "
            f"print(time.perf_counter() - t, {OWN_PEAK}, p.num_samples)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    secs, peak, got = out.stdout.split()
    data.unlink()
    assert int(got) == n
    return {f"plan_{kind}_s": float(secs), f"plan_{kind}_peak": int(peak)}


def measure(n: int, work: Path, ranks: int, workers: int) -> dict:
    import store

    url = str(work / f"store-{n}")
    t = time.perf_counter()
    synthetic_store(Path(url), n, SHARD)
    made_s = time.perf_counter() - t
    usable = n - n // 997
    resume_at = (2 * usable - 3 * GLOBAL) // GLOBAL * GLOBAL  # near the end of the second epoch
    row = {"samples": n, "made_s": made_s}
    if n <= RECORDS_UP_TO:
        materialize_reads(url, ranks, resume_at)
        row["records"] = start_up(url, ranks, workers, resume_at, work)
    t = time.perf_counter()
    meta = store.StoreWriter.open(url).build_index()
    row["index_s"] = time.perf_counter() - t
    row["index_bytes"] = sum(f["bytes"] for f in meta["files"].values())
    if n > RECORDS_UP_TO:
        materialize_reads(url, ranks, resume_at)
    row["indexed"] = start_up(url, ranks, workers, resume_at, work)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.inspect", url, "summary", "--json"], cwd=REPO, check=True,
                   capture_output=True)
    row["summary_s"] = time.perf_counter() - t
    shutil.rmtree(url, ignore_errors=True)
    if n <= RECORDS_UP_TO:  # a JSON of 30M records is ~6 GB, and parsed whole it takes ~10x that
        row.update(plan_row(n, work, "json"))
    row.update(plan_row(n, work, "jsonl"))
    return row


def mb(x: float) -> str:
    return f"{x / 1e6:9.1f}"


def print_table(rows: list[dict], base: dict) -> None:
    """`base`: the same measures on a store of BASE samples, whose memory is the processes' own (Python, torch):
    what grows with the store is the rest."""
    print(f"{'samples':>11} {'figure':<44} {'before':>12} {'after':>12}")
    for r in rows:
        n, ix = r["samples"], r["indexed"]
        rec = r.get("records")

        def line(what, before, after, n=n):
            print(f"{n:>11,} {what:<44} {before:>12} {after:>12}")

        def node(m, key):
            """What the node holds because of the store: every process's anonymous memory beyond the BASE
            store's, and the mapped index and order files once (the page cache shares them)."""
            return m["anon"] - base[key]["anon"] + m["mapped"] if m else None

        def per_sample(m, key, n=n):
            return f"{node(m, key) / n:.1f}" if m else "-"

        json_s, json_peak = (f"{r['plan_json_s']:.1f}", mb(r["plan_json_peak"]).strip()) if "plan_json_s" in r \
            else ("-", "-")
        line("plan (JSON whole / JSONL streamed), s", json_s, f"{r['plan_jsonl_s']:.1f}")
        line("plan (JSON whole / JSONL streamed), peak MB", json_peak, mb(r["plan_jsonl_peak"]).strip())
        line("index: build s / MB on disk", f"{r['index_s']:.1f}", mb(r["index_bytes"]).strip())
        line("index: bytes per sample on disk", "", f"{r['index_bytes'] / n:.1f}")
        line("start-up to the first batch, s", f"{rec['start_s']:.1f}" if rec else "-", f"{ix['start_s']:.1f}")
        line("node memory for the store, MB", mb(node(rec, "records")).strip() if rec else "-",
             mb(node(ix, "indexed")).strip())
        line("node memory for the store, bytes per sample", per_sample(rec, "records"), per_sample(ix, "indexed"))
        line("a rank's RSS, MB", mb(rec["rank_rss"]).strip() if rec else "-", mb(ix["rank_rss"]).strip())
        line("a DataLoader worker's RSS, MB", mb(rec["worker_rss"]).strip() if rec else "-",
             mb(ix["worker_rss"]).strip())
        line("resume near the end of epoch 2, s", f"{rec['resume_s']:.1f}" if rec else "-", f"{ix['resume_s']:.1f}")
        line("inspect summary (every record), s", "", f"{r['summary_s']:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="558128,3000000,30000000", help="comma list of sample counts")
    p.add_argument("--ranks", type=int, default=2, help="trainer ranks started at once on this node (default 2)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (default 2)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default a temporary one, removed)")
    for name in ("--rank", "--world", "--url", "--resume-at", "--ready"):  # a rank process of start_up
        p.add_argument(name, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rank is not None:
        rank_main(a.url, int(a.rank), int(a.world), a.workers, int(a.resume_at), a.ready)
        return 0
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="olaf-bench-scale-"))
    os.environ.setdefault("OLAF_CACHE", str(work / "cache"))
    rows = []
    try:
        base = measure(BASE, work, a.ranks, a.workers)
        for n in (int(x) for x in a.sizes.split(",")):
            rows.append(measure(n, work, a.ranks, a.workers))
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# olaf at scale: synthetic stores (shards of {SHARD}), global batch {GLOBAL}, micro-batch {MICRO}, "
          f"{a.ranks} ranks x {a.workers} workers on this node, CPU x{os.cpu_count()}; before = olaf before this "
          f"release (a LLaVA JSON parsed whole; the trainer from every record), after = now (a JSONL listing "
          f"streamed; the trainer from the sample index)")
    print_table(rows, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""See, verify and picture what a store holds.

    python -m pipeline.inspect STORE summary            samples, valid/bad, shards done/pending, teachers, bytes
    python -m pipeline.inspect STORE verify [--full]    checksums of every file, zarr chunk CRCs, Zarr == WebDataset
    python -m pipeline.inspect STORE stats [--per-shard] per task mean/std/min/max/NaN count
    python -m pipeline.inspect STORE show [KEY]         everything stored for one sample
    python -m pipeline.inspect STORE render [KEY] --out sample.png
                                                        the image beside PCA maps of its depth and seg targets
    python -m pipeline.inspect STORE unlease N [--force] break shard N's lease when its job is gone
    python -m pipeline.inspect STORE repair-teachers    rewrite a damaged teachers.yaml from the copy its shards confirm
    python -m pipeline.inspect STORE repair-manifest    rewrite a damaged olaf_store.json from its backup copy
    python -m pipeline.inspect STORE index              (re)build the sample index the trainer starts from
KEY is a sample id; without one, show and render take the first sample with every target valid.
Add --json (before the command) for machine-readable output. `verify` exits 1 naming each bad shard; any
unusable input (not a store, an unknown format version, a missing key) exits 2 with one message.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from store import (
    MANIFEST,
    Leases,
    Store,
    StoreError,
    StoreWriter,
    atomic_write,
    load_index,
    member_sizes,
    refuse_inside_store,
    verify_store,
)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# ---- summary ---------------------------------------------------------------------------------------------------


def summary(s: Store) -> dict:
    m = s.manifest
    teachers = s.teachers() if s.has_teachers() else {}
    per_task = {}
    for t, lay in m.tasks.items():
        done = s.done_shards([t])
        per_task[t] = {"shards_done": len(done), "samples_done": s.samples_done([t]),
                       "valid": sum(s.records[i].valid.get(t, 0) for i in done), "encoding": lay.encoding,
                       "values_dtype": lay.values_dtype, "shape": list(lay.shape)}
    tt = teachers.get("teachers", {})
    return {
        "store": s.url,
        "format": m.format,
        "dataset": m.dataset,
        "samples": s.num_samples,
        "shard_size": m.shard_size,
        "shards": {"total": s.num_shards, "done": len(s.done_shards()), "pending": len(s.pending_shards()),
                   "started": len(s.done_shards([]))},
        "bad_images": sum(r.bad_images for r in s.records.values()),
        "errors": sum(len(r.errors) for r in s.records.values()),
        "damaged_records": {str(k): v for k, v in sorted(s.damaged_records.items())},
        "tasks": per_task,
        "formats": m.formats,
        "zarr_compression": m.zarr_compression,
        "teachers": {
            "name": teachers.get("name"), "fidelity": teachers.get("fidelity"),
            "description": teachers.get("description") or None,
            "per_task": {t: {"weights": v.get("weights"), "weights_sha256": v.get("weights_sha256"),
                             "recipe_sha256": v.get("recipe_sha256"),
                             "quirks_applied": (v.get("recipe") or {}).get("quirks_applied")} for t, v in tt.items()},
        },
        "leases": {str(k): v for k, v in sorted(Leases(s.loc).all().items())},
        "bytes": s.bytes_used(),
        "code": m.code,
        "created": m.created, "finished": m.finished,
        "progress": m.progress,
        "index": index_state(s),
    }


def index_state(s: Store) -> dict:
    index, why = load_index(s.loc)
    if index is None:
        return {"used": False, "why": why}
    return {"used": True, "built": index.meta["built"], "usable": index.meta["usable"],
            "bytes": sum(f["bytes"] for f in index.meta["files"].values())}


def print_summary(d: dict) -> None:
    print(f"store       {d['store']}  ({d['format']})")
    ds = d["dataset"]
    where = ds.get("json") or ds.get("jsonl") or ds.get("webdataset")
    print(f"dataset     {where}  sha256 {str(ds.get('sha256'))[:16]}...  " +
          (f"images {ds.get('image_folder')}" if ds.get("image_folder") else f"{len(ds.get('shards', []))} tars"))
    sh = d["shards"]
    print(f"samples     {d['samples']} in {sh['total']} shards of {d['shard_size']}: {sh['done']} done, "
          f"{sh['pending']} pending; {d['bad_images']} bad images, {d['errors']} errors (errors.jsonl)")
    for shard, problem in d["damaged_records"].items():
        print(f"            !! shard {shard}: damaged record ({problem}); the next extraction run redoes it")
    for shard, lease in d["leases"].items():
        if lease["damaged"]:
            print(f"lease       shard {shard}: damaged (it holds nothing: the next extraction run takes the shard); "
                  f"python -m pipeline.inspect {d['store']} unlease {shard} removes it")
            continue
        until = _dt.datetime.fromtimestamp(lease["expires"], _dt.UTC).isoformat(timespec="seconds")
        state = "live" if lease["live"] else "expired or its owner is gone"
        print(f"lease       shard {shard}: {lease['owner']} until {until} ({state}); if that job is gone: "
              f"python -m pipeline.inspect {d['store']} unlease {shard}" + (" --force" if lease["live"] else ""))
    print(f"formats     {', '.join(d['formats'])}  (zarr compression: {d['zarr_compression']})")
    t = d["teachers"]
    print(f"teachers    {t['name']}  fidelity {t['fidelity']}" + (f"\n            !! {t['description']}" if t["description"] else ""))
    if not d["tasks"]:
        print("tasks       none: images, captions and ids only (extract_teachers --tasks adds teachers to it)")
    else:
        print(f"{'task':<6} {'shape':<12} {'encoding':<9} {'dtype':<8} {'done':>10} {'valid':>10}  weights / sha256 / recipe")
    for task, v in d["tasks"].items():
        pt = t["per_task"].get(task, {})
        w = pt.get("weights") or {}
        src = w.get("path") or f"{w.get('repo_id')}{'/' + w['subfolder'] if w.get('subfolder') else ''}@{w.get('revision', 'main')}"
        quirks = f" quirks: {', '.join(pt['quirks_applied'])}" if pt.get("quirks_applied") else ""
        print(f"{task:<6} {'x'.join(map(str, v['shape'])):<12} {v['encoding']:<9} {v['values_dtype']:<8} "
              f"{v['samples_done']:>10} {v['valid']:>10}  {src}  {str(pt.get('weights_sha256'))[:12]}  "
              f"{str(pt.get('recipe_sha256'))[:12]}{quirks}")
    b = d["bytes"]
    print(f"stored      {_human(b['total'])}  (zarr {_human(b['zarr'])}, wds {_human(b['wds'])})")
    c = d.get("code") or {}
    print(f"code        olaf {c.get('version')}  git {c.get('git')}  source {str(c.get('source_sha256'))[:12]}")
    print(f"created     {d['created']}   finished {d['finished'] or '-'}")
    ix = d["index"]
    print(f"index       built {ix['built']}: {ix['usable']:,} usable samples, {_human(ix['bytes'])} (the trainer starts "
          f"from it)" if ix["used"] else f"index       not used: {ix['why']} (python -m pipeline.inspect {d['store']} "
          f"index builds it)")


# ---- stats -----------------------------------------------------------------------------------------------------


class _Moments:
    def __init__(self):
        self.n, self.s, self.ss, self.lo, self.hi, self.nan = 0, 0.0, 0.0, np.inf, -np.inf, 0

    def add(self, x: np.ndarray):
        finite = np.isfinite(x)
        self.nan += int(x.size - finite.sum())
        x = x[finite].astype(np.float64)
        if x.size:
            self.n += x.size
            self.s += float(x.sum())
            self.ss += float((x * x).sum())
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def result(self) -> dict:
        if not self.n:
            return {"values": 0, "mean": None, "std": None, "min": None, "max": None, "nan": self.nan}
        mean = self.s / self.n
        return {"values": self.n, "mean": mean, "std": max(self.ss / self.n - mean * mean, 0.0) ** 0.5,
                "min": self.lo, "max": self.hi, "nan": self.nan}


def stats(s: Store, per_shard: bool = False, tasks=None, progress: bool = True) -> dict:
    tasks = [t for t in (tasks or s.tasks)]
    overall = {t: _Moments() for t in tasks}
    shards_out = {}
    use_zarr = "zarr" in s.formats
    for i in tqdm(s.done_shards([]), desc="stats", disable=not progress):
        rec = s.records[i]
        local = {t: _Moments() for t in tasks if t in rec.tasks}
        if use_zarr:
            for t in local:
                for idx in range(rec.start, rec.stop):  # one sample at a time: bounded memory at any shard size
                    if s.valid(t, idx):
                        x = s.decode_zarr(t, idx).numpy()
                        local[t].add(x)
                        overall[t].add(x)
        else:
            for d in s.iter_decoded(i, list(local)):
                for t, x in d["targets"].items():
                    if x is not None:
                        local[t].add(x.numpy())
                        overall[t].add(x.numpy())
        if per_shard:
            shards_out[str(i)] = {t: m.result() for t, m in local.items()}
    out = {"overall": {t: m.result() for t, m in overall.items()}}
    if per_shard:
        out["per_shard"] = shards_out
    return out


# ---- show / render ---------------------------------------------------------------------------------------------


def show(s: Store, key: str) -> dict:
    shard, raw = s.find(key)
    rec = s.records[shard]
    out = {"id": key, "shard": shard, "tasks": rec.tasks, "errors": [e for e in rec.errors if e["id"] == key]}
    targets = {}
    if raw is not None:
        d = s.decode(raw, rec.tasks)
        out.update(index=d["index"], record=d["record"], valid=d["valid"],
                   tar_members=member_sizes(raw))
        targets = {t: x for t, x in d["targets"].items() if x is not None}
    if "zarr" in s.formats:
        z = s.get(key, rec.tasks)
        out.setdefault("index", z["index"])
        out.setdefault("valid", z["valid"])
        if raw is not None:
            out["zarr_equals_wds"] = all(torch.equal(z["targets"][t], targets[t]) for t in targets) and \
                set(z["targets"]) == set(targets)
        targets = targets or z["targets"]
    out["targets"] = {
        t: {"shape": list(x.shape), "encoding": s.manifest.tasks[t].encoding, "mean": float(x.mean()),
            "std": float(x.std()), "min": float(x.min()), "max": float(x.max()),
            "nan": int((~torch.isfinite(x)).sum()), "first": [round(float(v), 5) for v in x.reshape(-1)[:6]]}
        for t, x in targets.items()
    }
    return out


def render(s: Store, key: str, out_png: str | Path) -> dict:
    from pipeline import render as rnd

    shard, raw = s.find(key)
    rec = s.records[shard]
    if raw is not None:
        d = s.decode(raw, rec.tasks)
        image, targets = d["image"], {t: x for t, x in d["targets"].items() if x is not None}
    else:
        image, targets = None, s.get(key, rec.tasks)["targets"]
    maps, vectors = {}, {}
    for t, x in targets.items():
        grid = s.manifest.tasks[t].grid
        if grid:
            maps[t] = rnd.pca_rgb(x.numpy(), tuple(grid))
        else:
            vectors[t] = x.numpy()
    teachers = s.teachers()
    title = f"{key}  (shard {shard}; teachers {teachers.get('name')}, fidelity {teachers.get('fidelity')})"
    if teachers.get("description"):
        title += "\n" + teachers["description"]
    png = rnd.compose(image, maps, vectors, title)
    atomic_write(out_png, png)
    return {"id": key, "out": str(out_png), "maps": list(maps), "vectors": list(vectors), "image": image is not None}


# ---- CLI -------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="a store written by pipeline.extract_teachers: a folder or a URL (s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables (also accepted after the command)")
    # --json after the command too; SUPPRESS keeps a flag given before the command from being reset
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of tables")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("summary", parents=[after], help="samples, valid/bad counts, shards done/pending, teachers, bytes")
    v = sub.add_parser("verify", parents=[after], help="checksums, chunk CRCs and Zarr/WebDataset agreement; exit 1 on damage")
    v.add_argument("--full", action="store_true", help="compare every sample, not a spot-check")
    v.add_argument("--spot", type=int, default=4, help="samples compared per shard without --full (default 4)")
    st = sub.add_parser("stats", parents=[after], help="per task mean/std/min/max/NaN count over valid targets")
    st.add_argument("--per-shard", action="store_true", help="also per shard")
    st.add_argument("--tasks", default=None, help="comma list (default: all)")
    sh = sub.add_parser("show", parents=[after], help="everything stored for one sample")
    sh.add_argument("key", nargs="?", help="the sample id (the dataset record's id; default: the first valid one)")
    r = sub.add_parser("render", parents=[after], help="a PNG: the image beside PCA-to-RGB maps of its targets")
    r.add_argument("key", nargs="?", help="the sample id (default: the first valid one)")
    r.add_argument("--out", required=True, help="output PNG path")
    sub.add_parser("repair-teachers", parents=[after], help="rewrite a damaged teachers.yaml from the copy the "
                   "store's manifest keeps")
    sub.add_parser("repair-manifest", parents=[after], help=f"rewrite a damaged {MANIFEST} from its backup copy")
    sub.add_parser("index", parents=[after], help="(re)build the sample index the trainer starts from (the "
                   "extraction builds it at the end of every run)")
    u = sub.add_parser("unlease", parents=[after], help="break the lease of a shard whose job is gone")
    u.add_argument("shard", type=int)
    u.add_argument("--force", action="store_true", help="break a lease that has not expired yet (its job must be gone)")
    return p


def _summary(s: Store, args) -> int:
    d = summary(s)
    print(json.dumps(d, indent=1)) if args.json else print_summary(d)
    return 0


def _verify(s: Store, args) -> int:
    d = verify_store(s, full=args.full, spot=args.spot, progress=not args.json)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0 if d["ok"] else 1
    for prob in d["store_problems"]:
        print(f"BAD store: {prob}")
    for shard, problems in d["bad_shards"].items():
        for prob in problems:
            print(f"BAD shard {shard}: {prob}")
    for note in d.get("notes", []):
        print(f"note: {note}")
    for name in d["orphans"]:
        print(f"note: {name} is not part of any commit (left by an interrupted write; the next extraction run "
              f"removes or overwrites it)")
    print(f"{'OK' if d['ok'] else 'DAMAGED'}: {d['shards_checked']} done shards, {_human(d['bytes_hashed'])} "
          f"hashed, zarr == wds on {d['agreement']}; {len(d['bad_shards'])} bad shard(s)"
          + (f"; {len(d['shards_not_done'])} shard(s) not done yet" if d["shards_not_done"] else ""))
    return 0 if d["ok"] else 1


def _stats(s: Store, args) -> int:
    d = stats(s, per_shard=args.per_shard, tasks=args.tasks.split(",") if args.tasks else None,
              progress=not args.json)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    rows = [("all", t, m) for t, m in d["overall"].items()]
    rows += [(k, t, m) for k, v in d.get("per_shard", {}).items() for t, m in v.items()]

    def f(x):
        return f"{x:10.4f}" if x is not None else f"{'-':>10}"

    print(f"{'shard':<6} {'task':<6} {'values':>12} {'mean':>10} {'std':>10} {'min':>10} {'max':>10} {'NaN':>6}")
    for shard, t, m in rows:
        print(f"{shard:<6} {t:<6} {m['values']:>12} {f(m['mean'])} {f(m['std'])} {f(m['min'])} {f(m['max'])} "
              f"{m['nan']:>6}")
    return 0


def _show(s: Store, args) -> int:
    print(json.dumps(show(s, args.key or s.first_valid_key()), indent=1, default=str))
    return 0


def _render(s: Store, args) -> int:
    refuse_inside_store(args.out, "--out")
    d = render(s, args.key or s.first_valid_key(), args.out)
    print(json.dumps(d) if args.json else f"wrote {d['out']} (image{' + ' if d['maps'] else ''}"
          f"{' + '.join(d['maps'])} maps{', ' + ' + '.join(d['vectors']) + ' strip' if d['vectors'] else ''})")
    return 0


def _repair_teachers(s: Store, args) -> int:
    fixed = StoreWriter(s.loc, s.manifest).restore_teachers()
    print(f"restored {s.url}'s teachers.yaml from its manifest's copy" if fixed == "teachers.yaml" else
          f"rewrote the copy of the teacher identity in {s.url}'s manifest from teachers.yaml")
    return 0


def _index(s: Store, args) -> int:
    meta = StoreWriter(s.loc, s.manifest).build_index()
    print(json.dumps({k: meta[k] for k in ("built", "usable", "files")}) if args.json else
          f"built {s.url}'s sample index: {meta['usable']:,} usable samples of {len(meta['shards']):,} shards, "
          f"{sum(f['bytes'] for f in meta['files'].values()) / 1e6:.1f} MB"
          + ("" if meta["shards"] else f" (no shard of the {s.num_shards:,} is committed yet: the extraction "
                                       f"commits them, and builds the index again at the end of every run)"))
    return 0


def _unlease(s: Store, args) -> int:
    held = Leases(s.loc).break_lease(args.shard, force=args.force)
    print(json.dumps({"shard": args.shard, "removed": held}) if args.json else
          f"removed the {'damaged lease' if held['damaged'] else 'lease'} of shard {args.shard}"
          f"{'' if held['damaged'] else ' (' + held['owner'] + ')'}; the next extraction run computes it")
    return 0


COMMANDS = {"summary": _summary, "verify": _verify, "stats": _stats, "show": _show, "render": _render,
            "unlease": _unlease, "repair-teachers": _repair_teachers, "index": _index}


def _repair_manifest(url: str) -> int:
    m, notes = StoreWriter.restore_manifest(url)
    print(f"restored {url}'s {MANIFEST} from its backup ({m.num_samples} samples, tasks {', '.join(m.tasks) or 'none'}, "
          f"generation {m.generation})" + "".join(f"\n  reconciled with the shards' records: {n}" for n in notes)
          + f"\nrun `python -m pipeline.inspect {url} verify` next")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "repair-manifest":  # the one command that cannot open the store first
            return _repair_manifest(args.store)
        return COMMANDS[args.command](Store(args.store), args)
    except (StoreError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader has seen enough
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (stdout's own close would raise again at exit)
        return 0
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # damaged data: a truncated tar, a bad CRC
        print(f"error: cannot read {args.store}: {type(e).__name__}: {e}\n"
              f"  run `python -m pipeline.inspect {args.store} verify` to find the damaged shards", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What a run reports: its progress (kept in the store's manifest as it goes) and the summary at the end."""

from __future__ import annotations

import time


def progress(done: dict, total: int, t0: float, failed: dict, utilisation: list | None = None) -> dict:
    n = sum(r.count for r in done.values())
    secs = max(time.time() - t0, 1e-9)
    per_sample = lambda key: round(1e3 * sum(r.extra.get(key, 0) for r in done.values()) / max(n, 1), 2)  # noqa: E731
    p = {"samples_done": n, "samples_planned": total, "shards_done": len(done), "shards_failed": sorted(failed),
         "bad_images": sum(r.bad_images for r in done.values()), "seconds": round(secs, 1),
         "samples_per_s": round(n / secs, 2), "decode_cpu_ms_per_sample": per_sample("decode_cpu_s"),
         "teacher_ms_per_sample": per_sample("teacher_s")}
    if utilisation:
        fr = [u["busy_fraction"] for u in utilisation if u["busy_fraction"] is not None]
        p["actor_busy_fraction"] = round(sum(fr) / len(fr), 3) if fr else None
    return p


def print_summary(m, plan, done, records, failed, n_err, seconds, work, by_others=()) -> None:
    p = m.progress if work else {}
    n_done = sum(r.count for r in done.values())
    others = f"{len(by_others)} done by another job meanwhile, " if by_others else ""
    rows = [
        ("shards", f"{len(done)} written now, {plan.num_shards - len(work)} were already done, {others}"
                   f"{len(failed)} failed ({len(records)} of {plan.num_shards} done in the store)"),
        ("samples", f"{n_done} written now ({sum(r.bad_images for r in done.values())} bad images); "
                    f"{plan.num_samples} in the store"),
        ("valid targets", ", ".join(f"{t} {sum(r.valid.get(t, 0) for r in records.values())}" for t in m.tasks)
         + " (store)" if m.tasks else "none: no teacher (images, captions and ids only; --tasks adds them later)"),
        ("errors.jsonl", f"{n_err} lines"),
    ]
    if work:
        rows += [
            ("throughput", f"{p['samples_per_s']} samples/s over {p['seconds']} s (wall {seconds:.1f} s incl. start-up)"),
            ("decode", f"{p['decode_cpu_ms_per_sample']} CPU ms/sample"),
        ]
    if work and any(work.values()):
        rows.append(("teachers", f"{p['teacher_ms_per_sample']} ms/sample on {m.extraction.get('device')}, "
                                 f"actors busy {p.get('actor_busy_fraction')} of their running time"))
    print("\nextraction summary")
    for k, v in rows:
        print(f"  {k:<14} {v}")
    if failed:
        print("  FAILED shards: " + "; ".join(f"{i}: {r}" for i, r in sorted(failed.items())))
        print("  re-run the same command to retry them")
    busy = p.get("actor_busy_fraction")
    if busy is not None and busy < 0.8 and n_done > 0:
        print("  note: the teachers waited for input part of the time: add CPUs (decode) or --prefetch")

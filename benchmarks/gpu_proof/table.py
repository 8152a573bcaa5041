"""The headline figures of a proof, a line per part."""

from __future__ import annotations

import contextlib


def table(data: dict) -> str:
    """The headline figures, one line each."""
    env, parts = data["env"], data["parts"]
    gpu = (env.get("gpu") or {}).get("name") or f"CPU x{env.get('cpu_count')}"
    lines = [f"# olaf GPU proof ({data['mode']}): {gpu}, driver {env.get('driver')}, CUDA {env.get('cuda')}, "
             f"torch {env.get('torch')}, code {(env.get('code') or {}).get('git')}",
             f"{'part':<9} {'status':<7} {'s':>6}  figures"]
    for name, p in parts.items():
        lines.append(f"{name:<9} {p['status']:<7} {p.get('seconds', 0):>6}  {headline(name, p)}")
    return "\n".join(lines)


def headline(name: str, p: dict) -> str:
    """What the part measured, in one line; a piece it did not get to is left out."""
    pieces = []
    for piece in HEADLINES[name]:
        with contextlib.suppress(KeyError, TypeError, ValueError, ZeroDivisionError):
            pieces.append(piece(p))
    stop = (p["error"].splitlines() or [""])[0] if p.get("error") else (
        f"stopped before {p['stopped_before']}" if "stopped_before" in p else None)
    return "; ".join(pieces + ([stop] if stop else [])) or "-"


def _best(r: dict) -> dict:
    return max((x for x in r["sweep"] if "img_s" in x), key=lambda x: x["img_s"])


HEADLINES = {
    "teachers": [
        lambda p: ", ".join(f"{t} {_best(r)['img_s']:.0f} img/s (bs {_best(r)['batch']}, MFU {_best(r).get('mfu')})"
                            for t, r in p["per_teacher"].items()),
        lambda p: (f"all three {p['all_three']['img_s']:.1f} img/s (bs {p['all_three']['batch']}, "
                   f"{p['all_three']['peak_mem_gib']} GiB)"),
        lambda p: (f"original loop {p['original_loop']['img_s']:.1f} img/s: batched "
                   f"x{p['original_loop']['batched_vs_original']}")],
    "recipes": [
        lambda p: (f"device {p['recipes']['device_ms_per_image_all']} ms/img vs Pillow "
                   f"{p['recipes']['pillow_cpu_ms_per_image_all']} CPU ms/img"),
        lambda p: f"bit-identical to Pillow: {p['recipes']['all_bit_identical']}"],
    "pipeline": [
        lambda p: (f"{p['job']['img_s']} img/s over {p['job']['progress']['samples_done']} images, actors busy "
                   f"{p['job']['actor_busy']}"),
        lambda p: f"decode {p['job']['decode_cores']} cores, node {p['job']['node_cores_busy']['median']} cores busy"],
    "pt": [
        lambda p: ", ".join(f"{k} {r['ms_per_sample']} ms/smp {r['peak_mem_gib']} GiB" for k, r in p["modes"].items()),
        lambda p: f"task tokens + heads share {p['task_tokens_and_heads_share']}",
        lambda p: (f"VLoRA under fsdp {p['vlora_fsdp'].get('ms_per_sample')} ms/smp "
                   f"{p['vlora_fsdp'].get('peak_mem_gib')} GiB, trained state {p['vlora_fsdp']['trained_state_bytes']:,} B"),
        lambda p: f"teachers in the step x{p['teachers_in_step']['stored_vs_in_step']}",
        lambda p: f"stored targets stream {p['loader']['samples_per_s']} smp/s: x{p['loader']['headroom']} the step"],
    "probe": [
        lambda p: (f"one pass {p['designs']['olaf: one pass, every task']['ms_per_sample']} ms/smp "
                   f"({p['designs']['olaf: one pass, every task']['probes']} probes)"),
        lambda p: f"three jobs {p['authors_total_ms_per_sample']} ms/smp: x{p['one_pass_vs_jobs']}"],
}

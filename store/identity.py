"""teachers.yaml: which teachers computed a store's targets, and the rule a reader compares it by.

The identity is data handed in by the extraction (recipes.manifest.TeacherManifest.identity(): per task the
recipe and its sha256, the weights reference and sha256, the compute dtype); the store writes it, reads it back,
and compares it with what a reader expects, as docs/format.md says a reader must.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from store import layout
from store.fs import Location, StoreError


def write_teachers(loc: Location, teachers: dict) -> None:
    """teachers.yaml: {format, name, fidelity, stored_dtype, description, teachers: {task: {recipe_sha256, weights,
    weights_sha256, compute_dtype, recipe}}}."""
    text = yaml.safe_dump(teachers, sort_keys=False, default_flow_style=None, width=120)
    loc.write_bytes(layout.TEACHERS, text.encode())


def read_teachers(loc: Location, missing_ok: bool = False) -> dict | None:
    if not loc.isfile(layout.TEACHERS):
        if missing_ok:
            return None
        raise StoreError(f"{loc}: {layout.TEACHERS} is missing: the store does not say which teachers computed it; "
                         f"{CHECK.format(store=loc)}")
    try:
        d = yaml.safe_load(loc.read_bytes(layout.TEACHERS))
    except yaml.YAMLError as e:
        raise StoreError(f"{loc.url_of(layout.TEACHERS)} is damaged (not YAML: {str(e).splitlines()[0]}); "
                         f"{CHECK.format(store=loc)}") from None
    if not isinstance(d, dict) or not isinstance(d.get("teachers", {}), dict):
        raise StoreError(f"{loc.url_of(layout.TEACHERS)} is damaged (not a teacher identity mapping); "
                         f"{CHECK.format(store=loc)}")
    return d


CHECK = ("`python -m pipeline.inspect {store} verify` checks it against the manifest's copy and what the shards "
         "record, and says how to repair it")
REPAIR = "`python -m pipeline.inspect {store} repair-teachers`"
PROVENANCE_FIELDS = ("weights_sha256", "weights_files_sha256", "recipe_sha256", "compute_dtype")


def recorded_teachers(made_by: dict[int, dict | None]) -> tuple[dict[str, dict], list[str]]:
    """What the shards' records say computed each task ({task: provenance}; `made_by`: each shard's record's
    `teachers`): the evidence a teacher identity is checked against. A task whose shards name different
    teachers is a problem, and no evidence."""
    seen: dict[str, dict[str, list[int]]] = {}
    for i, teachers in sorted(made_by.items()):
        for t, prov in (teachers or {}).items():
            seen.setdefault(t, {}).setdefault(json.dumps(prov, sort_keys=True), []).append(i)
    evidence, problems = {}, []
    for t, provs in seen.items():
        if len(provs) == 1:
            evidence[t] = json.loads(next(iter(provs)))
        else:
            problems.append(f"{t}: the shards were computed by {len(provs)} different teachers (shards "
                            f"{', '.join(str(v[0]) for v in provs.values())}, ...): re-extract {t} into a new --output")
    return evidence, problems


def evidence_mismatches(evidence: dict[str, dict], identity: dict, tasks=None) -> list[str]:
    """Where a teacher identity names other teachers than those the shards record (fields both sides know)."""
    out = []
    named = identity.get("teachers") if isinstance(identity, dict) else None
    for t, prov in evidence.items():
        if tasks is not None and t not in tasks:
            continue
        ident = (named or {}).get(t)
        if not isinstance(ident, dict):
            out.append(f"{t}: no teacher named, though the shards hold its targets")
            continue
        for f in PROVENANCE_FIELDS:
            have, said = prov.get(f), ident.get(f)
            if have and said and have != said:
                out.append(f"{t}: {f} {str(said)[:16]}..., the shards record {str(have)[:16]}...")
    return out


@dataclass
class IdentityCheck:
    """teachers.yaml and the manifest's copy, held against the shards' records: `problems`, and which copy a
    repair rewrites from the other (`repair`: "teachers.yaml", "manifest" or None: no repair can be trusted)."""

    problems: list[str]
    repair: str | None = None


def check_identity(loc: Location, copy: dict | None, records: dict) -> IdentityCheck:
    """Neither copy is trusted over the other without evidence: the shards' records (each says what computed it)
    decide which one a repair keeps."""
    evidence, problems = recorded_teachers({i: r.teachers for i, r in records.items()})
    name, store = loc.url_of(layout.TEACHERS), str(loc)
    try:
        stored, damage = read_teachers(loc), None
    except StoreError as e:
        stored, damage = None, str(e).split("; `python", 1)[0]
    if stored is not None and (copy is None or stored == copy):
        wrong = evidence_mismatches(evidence, stored)
        if wrong:
            problems.append(f"{name} names other teachers than the shards record ({'; '.join(wrong)}): the store's "
                            f"provenance is damaged or forged; re-extract into a new --output")
        return IdentityCheck(problems)
    if copy is None:
        return IdentityCheck(problems + [f"{damage}; the manifest keeps no copy (written by an older olaf): restore "
                                         f"it from a backup of yours, or re-extract into a new --output"])
    copy_wrong = evidence_mismatches(evidence, copy)
    if stored is None:
        if copy_wrong:
            return IdentityCheck(problems + [f"{damage}, and the manifest's copy names other teachers than the shards "
                                             f"record ({'; '.join(copy_wrong)}): re-extract into a new --output"])
        confirmed = "the shards' records confirm the copy" if evidence else \
            "no shard records its teachers to confirm the copy (written by an older olaf)"
        return IdentityCheck(problems + [f"{damage}; {confirmed}: {REPAIR.format(store=store)} restores it from the "
                                         f"manifest's copy"], "teachers.yaml")
    differs = f"{name} differs from the identity the manifest records"
    if not [t for t in evidence if t in (stored.get("teachers") or {}) or t in (copy.get("teachers") or {})]:
        return IdentityCheck(problems + [f"{differs}, and no shard records which teachers computed it (written by "
                                         f"an older olaf): neither copy can be trusted over the other; restore "
                                         f"{layout.TEACHERS} from a backup of yours, or re-extract"])
    stored_wrong = evidence_mismatches(evidence, stored)
    if copy_wrong and not stored_wrong:
        return IdentityCheck(problems + [f"{differs}; the shards' records confirm {layout.TEACHERS}, not the manifest's "
                                         f"copy ({'; '.join(copy_wrong)}): {REPAIR.format(store=store)} rewrites the "
                                         f"copy from {layout.TEACHERS}"], "manifest")
    if stored_wrong and not copy_wrong:
        return IdentityCheck(problems + [f"{differs}; the shards' records confirm the manifest's copy, not "
                                         f"{layout.TEACHERS} ({'; '.join(stored_wrong)}): {REPAIR.format(store=store)} "
                                         f"restores it from the copy"], "teachers.yaml")
    if stored_wrong:
        return IdentityCheck(problems + [f"{differs}, and neither matches what the shards record "
                                         f"({'; '.join(stored_wrong + copy_wrong)}): re-extract into a new --output"])
    return IdentityCheck(problems + [f"{differs} in what the shards' records do not cover (fields: "
                                     f"{', '.join(_differing(stored, copy))}): neither copy can be trusted over the "
                                     f"other; restore {layout.TEACHERS} from a backup of yours, or re-extract"])


def _differing(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out[:6]


_LOCATION_FIELDS = ("path",)  # where weights are, not which weights they are


def _reference(w: dict | None) -> dict:
    return {k: v for k, v in (w or {}).items() if k not in _LOCATION_FIELDS}


def _recipe_diff(s: dict, e: dict) -> str:
    keys = sorted(set(s.get("recipe", {})) | set(e.get("recipe", {})))
    return ", ".join(k for k in keys if s.get("recipe", {}).get(k) != e.get("recipe", {}).get(k)) or "?"


def _weights(t: str, s: dict, e: dict) -> tuple[list[str], list[str]]:
    fs, fe = s.get("weights_files_sha256"), e.get("weights_files_sha256")
    if fs and fe:  # both sides read the files: their content decides, wherever they are
        if fs == fe:
            return [], []
        return [f"{t}: the weight files differ: the store's targets come from files of content sha256 {fs[:16]}..., "
                f"the manifest's weights are {fe[:16]}...: use the manifest the store was extracted with, or "
                f"re-extract with these weights"], []
    ws, we = s.get("weights_sha256"), e.get("weights_sha256")
    sw, ew = s.get("weights") or {}, e.get("weights") or {}
    out, notes = [], []
    if ws and we:
        if ws != we:
            out.append(f"{t}: weights sha256 differs: store {ws[:16]}..., expected {we[:16]}...")
    elif _reference(sw) != _reference(ew):
        out.append(f"{t}: weights differ: store {sw}, expected {ew}")
    if sw.get("path") != ew.get("path") and _reference(sw) == _reference(ew) and not (ws and we and ws != we):
        notes.append(f"{t}: the teacher weights are named by another location (store: {sw.get('path')}, "
                     f"manifest: {ew.get('path')}); only the location differs, so the store is accepted. The "
                     f"store recorded weights sha256 {str(ws)[:16]}...: if the weights at the new location may "
                     f"differ, re-extract with them (`--tasks` for just that teacher)")
    return out, notes


def teacher_mismatches(stored: dict, expected: dict, tasks) -> tuple[list[str], list[str]]:
    """(mismatches, notes) between the store's teachers and the expected ones (identity dicts) for `tasks`. What
    must agree: the recipe sha256, the compute dtype, and the weights sha256 where both sides know it, else the
    declared reference (HF repo id, subfolder, revision, variant). When both sides know the weight files' content
    sha256, it decides alone. Otherwise a local `path:` is only where the weights were: when that alone differs it
    is a note, not a mismatch."""
    out, notes = [], []
    for t in tasks:
        s, e = stored.get("teachers", {}).get(t), expected.get("teachers", {}).get(t)
        if s is None or e is None:
            out.append(f"{t}: the {'store' if s is None else 'expected manifest'} has no {t} teacher")
            continue
        if s.get("recipe_sha256") != e.get("recipe_sha256"):
            out.append(f"{t}: recipe differs (fields: {_recipe_diff(s, e)})")
        ds, de = s.get("compute_dtype"), e.get("compute_dtype")
        if ds and de and ds != de:
            out.append(f"{t}: computed in {ds}, expected {de} (targets differ by the dtype's rounding: "
                       f"re-extract with the manifest's dtypes, or use a manifest that says {ds})")
        elif de and not ds:
            notes.append(f"{t}: the store does not record the dtype its teacher ran in (written by an older olaf)")
        problems, more = _weights(t, s, e)
        out += problems
        notes += more
    return out, notes


def weights_mismatches(a: dict, b: dict, tasks) -> list[str]:
    """Where two teacher identities name other weights for `tasks` (the content hashes decide where both sides
    know them; recipes and dtypes may differ): e.g. a probe's training and eval stores."""
    out = []
    for t in tasks:
        ta, tb = a.get("teachers", {}).get(t), b.get("teachers", {}).get(t)
        if ta is not None and tb is not None:
            out += _weights(t, ta, tb)[0]
    return out

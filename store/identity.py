"""teachers.yaml: which teachers computed a store's targets, and the rule a reader compares it by.

The identity is data handed in by the extraction (recipes.manifest.TeacherManifest.identity(): per task the
recipe and its sha256, the weights reference and sha256, the compute dtype); the store writes it, reads it back,
and compares it with what a reader expects, as docs/format.md says a reader must.
"""

from __future__ import annotations

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
        raise StoreError(f"{loc}: {layout.TEACHERS} is missing: the store does not say which teachers computed it")
    try:
        d = yaml.safe_load(loc.read_bytes(layout.TEACHERS))
    except yaml.YAMLError as e:
        raise StoreError(f"{loc.url_of(layout.TEACHERS)} is damaged (not YAML: {str(e).splitlines()[0]}); "
                         f"{REPAIR.format(store=loc)}") from None
    if not isinstance(d, dict) or not isinstance(d.get("teachers", {}), dict):
        raise StoreError(f"{loc.url_of(layout.TEACHERS)} is damaged (not a teacher identity mapping); "
                         f"{REPAIR.format(store=loc)}")
    return d


REPAIR = "restore it with `python -m pipeline.inspect {store} repair-teachers` (from the manifest's copy)"


def teachers_problems(loc: Location, copy: dict | None) -> list[str]:
    """What is wrong with teachers.yaml: unreadable, or not the identity the manifest keeps a copy of."""
    try:
        stored = read_teachers(loc)
    except StoreError as e:
        return [str(e)]
    if copy is not None and stored != copy:
        return [f"{loc.url_of(layout.TEACHERS)} differs from the identity the manifest records; "
                f"{REPAIR.format(store=loc)}"]
    return []


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

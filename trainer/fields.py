"""What users hand in as JSON (an export's config.json, a released model folder's), read so that every field olaf
relies on is checked: a problem names the file and the field, never a KeyError or a TypeError from deep inside."""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainer.errors import TrainerError

REQUIRED = object()
KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
         list: "a list"}


def is_kind(value, kind) -> bool:
    """Whether a value read from JSON or YAML is of `kind` (a type of KINDS): `true` is no count, a number is a
    finite int or float, a word is never a number."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


class JsonFile:
    """A JSON object from a file; `get` reads one field, checked."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise TrainerError(f"{self.path} is missing") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise TrainerError(f"{self.path} is not readable JSON ({str(e).splitlines()[0][:120]}): restore it from "
                               f"the export or the release it came from") from None
        if not isinstance(data, dict):
            kind = {type(None): "null", list: "list", str: "string", bool: "boolean"}.get(type(data), "number")
            raise TrainerError(f"{self.path} holds a JSON {kind}, not an object of fields: restore it from the "
                               f"export or the release it came from")
        self.data = data

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind, default=REQUIRED, choices=None, low=None):
        """The field `key`, of `kind` (a type of KINDS), among `choices`, at least `low`; `default` when it is
        absent or null (REQUIRED: it must be there)."""
        value = self.data.get(key)
        if value is None:
            if default is REQUIRED:
                raise self.error(key, "is missing" if key not in self.data else "is null",
                                 f"{KINDS[kind]} is needed")
            return default
        if not is_kind(value, kind):
            raise self.error(key, f"is {value!r}", f"it must be {KINDS[kind]}")
        if choices is not None and value not in choices:
            raise self.error(key, f"is {value!r}", f"it must be one of {', '.join(map(str, choices))}")
        if low is not None and value < low:
            raise self.error(key, f"is {value!r}", f"it must be >= {low}")
        return value

    def error(self, key: str, what: str, why: str) -> TrainerError:
        return TrainerError(f"{self.path}: field {key!r} {what}: {why}")

"""Checked access to a parsed JSON file: each failure is a SourceError naming the file and the
dotted key, so a user can find the bad entry in a file of a million entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.sources.errors import SourceError

_EXPECTED = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
_JSON_NAMES = {dict: "object", list: "list", str: "string", type(None): "null"}


def type_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def is_kind(value: Any, kind: type) -> bool:
    # JSON true is a Python bool, and bool is an int subclass: an id of `true` is an error.
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class JsonFile:
    """A whole JSON file, loaded at once (annotation files fit in memory; images never do)."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        try:
            # bytes, not text: json detects UTF-8/16/32 itself; a bad encoding is a ValueError too.
            self.root: Any = json.loads(Path(path).read_bytes())
        except ValueError as err:
            raise SourceError(f"{self.path}: not valid JSON: {err}") from None

    def error(self, loc: str, message: str) -> SourceError:
        return SourceError(f"{self.path}: {loc or '(top level)'}: {message}")

    def check(self, value: Any, kind: type, loc: str) -> Any:
        if not is_kind(value, kind):
            raise self.error(loc, f"expected {_EXPECTED[kind]}, got {type_name(value)}")
        return value

    def get(self, obj: dict, loc: str, key: str, kind: type, optional: bool = False) -> Any:
        """obj[key], of type `kind`; `loc` is where obj sits ("" for the top level)."""
        where = f"{loc}.{key}" if loc else key
        if key not in obj:
            if optional:
                return None
            raise self.error(where, "missing")
        return self.check(obj[key], kind, where)

    def items(self, obj: dict, loc: str, key: str, kind: type) -> list:
        """obj[key], a list whose every element is of type `kind`."""
        where = f"{loc}.{key}" if loc else key
        values = self.get(obj, loc, key, list)
        for i, value in enumerate(values):
            self.check(value, kind, f"{where}[{i}]")
        return values

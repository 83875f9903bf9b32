"""A stage's record in two parts: its figures (what `dvc metrics show` lists and `dvc exp show`
compares: recalls, accuracies, losses) and its info (counts, sizes, chance levels, hashes,
devices, timings). dvc.yaml declares the figures as metrics and the info as a cached output, which
DVC's run-cache restores like any other output; in a metrics file they would be columns that
differ between runs without saying anything about the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def split(record: Mapping[str, Any], info_keys: frozenset[str]) -> tuple[dict, dict]:
    """(figures, info): every key in `info_keys`, at any depth of nested dicts, goes to info with
    what it holds; the rest stays in figures. Lists are values (a per-epoch history stays whole).
    Dicts left empty are dropped, so each part keeps only the paths it has values under."""
    figures: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for key, value in record.items():
        if key in info_keys:
            info[key] = value
        elif isinstance(value, Mapping):
            f, i = split(value, info_keys)
            if f:
                figures[key] = f
            if i:
                info[key] = i
        else:
            figures[key] = value
    return figures, info


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    """The record `split` took apart, whole again: b's keys into a, nested dicts merged. A key
    both hold with a value that is not a dict in both is an error: the parts did not come from
    one record."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = merge(out[key], value)
        else:
            raise ValueError(f"{key!r} is in both parts of the record")
    return out

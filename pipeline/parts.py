"""The resumable per-shard map that every shard-wise stage (detect, embed) runs on.

A stage's result over many shards is the concatenation of one part per shard. Parts live under
`scratch/<run key>/`, where the run key hashes everything but the shards that a part depends on
(the model's digest, the settings, library versions, the code that computes it); each part is
named after a digest of its own inputs (the shard's bytes, and whatever else the stage reads for
it) and written under a temporary name, renamed when whole. A killed run therefore redoes only
the shards without a part, a changed shard or setting never reuses a stale part, and once the
output is assembled the parts of other runs and of shards no longer read are pruned.

A part is a pure function of its inputs, so it does not matter where it was computed: this is
also the unit a distributed backend would compute.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.files import atomic_dir, atomic_file, remove_unfinished

RUN_KEY = re.compile(r"[0-9a-f]{16}")


def digest(value: Any) -> str:
    """16 hex digits of a JSON-able value's canonical form."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def code_digests(modules: Iterable[ModuleType | str]) -> list[str]:
    """sha256 of each module's source: a part computed by other code is not reused."""
    out = []
    for m in modules:
        module = sys.modules[m] if isinstance(m, str) else m
        out.append(hashlib.sha256(Path(str(module.__file__)).read_bytes()).hexdigest())
    return out


def run_key(spec: Mapping[str, Any], modules: Iterable[ModuleType | str]) -> str:
    """The run key of a stage: its spec (weights digest, settings, device, versions) and its code."""
    return digest({**spec, "code": code_digests(modules)})


class Parts:
    """The part folder of one run: `get` returns a shard's part, computing it when absent;
    `prune` removes what this run did not use."""

    def __init__(self, scratch: Path | str, key: str):
        if not RUN_KEY.fullmatch(key):
            raise ValueError(f"run key {key!r}: expected 16 hex digits")
        self.scratch = Path(scratch)
        self.folder = self.scratch / key
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_unfinished(self.folder)  # a killed run's half-written part
        self.used: list[Path] = []
        self.reused = 0

    def get(self, name: str, make: Callable[[Path], None], folder: bool = False) -> Path:
        """The part `name`; when absent, `make(tmp)` writes it (a file, or with folder=True a
        folder) at a temporary path that becomes the part only when make returns."""
        part = self.folder / name
        if part.exists():
            self.reused += 1
        else:
            with atomic_dir(part) if folder else atomic_file(part) as tmp:
                make(tmp)
        self.used.append(part)
        return part

    def prune(self) -> None:
        """Remove other runs' part folders and the parts of shards this run did not read."""
        for entry in self.scratch.iterdir():
            if entry.is_dir() and entry != self.folder and RUN_KEY.fullmatch(entry.name):
                shutil.rmtree(entry)
        keep = set(self.used)
        for part in self.folder.iterdir():
            if part not in keep:
                shutil.rmtree(part) if part.is_dir() else os.unlink(part)

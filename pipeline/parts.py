"""The resumable per-shard map that every shard-wise stage (detect, embed) runs on.

A stage's result over many shards is the concatenation of one part per shard. Parts live under
`scratch/<run key>/`, where the run key hashes everything but the shards that a part depends on
(the model's digest, the settings, library versions, the code that computes it); each part is
named after a digest of its own inputs (the shard's bytes, and whatever else the stage reads for
it) and written under a temporary name, renamed when whole. A killed run therefore redoes only
the shards without a part, a changed shard or setting never reuses a stale part, and once the
output is assembled the parts of other runs and of shards no longer read are pruned.

A part is a pure function of its inputs, so it does not matter where it was computed: the
backend (pipeline.backend) makes each absent part in this process or on a Ray worker, and a run
killed on one backend resumes on the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.files import atomic_dir, atomic_file, remove_unfinished

if TYPE_CHECKING:
    from pipeline.backend import Workers

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


@dataclass(frozen=True)
class Job:
    """One part to compute: its name in the run folder, the worker's `make` arguments after the
    temporary path, and the names of parts it reads (computed first)."""

    name: str
    args: tuple
    after: tuple[str, ...] = ()


class PartMaker:
    """The worker side of a part: `make(tmp, *args, progress=…)` writes it at a temporary path
    (a file, or with folder=True a folder) that becomes the part only when make returns."""

    def make(self, tmp: Path, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def make_part(self, path: str, folder: bool, args: tuple, progress: Callable[[int], None]) -> None:
        with atomic_dir(Path(path)) if folder else atomic_file(Path(path)) as tmp:
            self.make(tmp, *args, progress=progress)


class Parts:
    """The part folder of one run: `compute` has the workers (pipeline.backend) make the parts
    that are absent; `prune` removes what this run did not use."""

    def __init__(self, scratch: Path | str, key: str, folders: bool = False):
        if not RUN_KEY.fullmatch(key):
            raise ValueError(f"run key {key!r}: expected 16 hex digits")
        self.scratch = Path(scratch)
        self.folder = self.scratch / key
        self.folders = folders  # each part a folder, not a file
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_unfinished(self.folder)  # a killed run's half-written part
        self.used: list[Path] = []
        self.reused = 0

    def path(self, name: str) -> Path:
        return self.folder / name

    def compute(
        self, jobs: list[Job], workers: Workers, progress: Callable[[int], None] | None = None
    ) -> Iterator[tuple[Job, bool]]:
        """Every job's part, made by `workers` where absent; yields (job, reused) in job order as
        each part is whole, so a killed run keeps every finished part."""
        todo = [j for j in jobs if not self.path(j.name).exists()]
        position = {j.name: i for i, j in enumerate(todo)}
        after = [[position[a] for a in j.after if a in position] for j in todo]
        calls = [(str(self.path(j.name)), self.folders, j.args) for j in todo]
        made = workers.map("make_part", calls, after, progress)
        for job in jobs:
            fresh = job.name in position
            if fresh:
                next(made)
            else:
                self.reused += 1
            self.used.append(self.path(job.name))
            yield job, not fresh
        for _ in made:  # nothing left: every job was taken above
            pass

    def prune(self) -> None:
        """Remove other runs' part folders and the parts of shards this run did not read."""
        for entry in self.scratch.iterdir():
            if entry.is_dir() and entry != self.folder and RUN_KEY.fullmatch(entry.name):
                shutil.rmtree(entry)
        keep = set(self.used)
        for part in self.folder.iterdir():
            if part not in keep:
                shutil.rmtree(part) if part.is_dir() else os.unlink(part)

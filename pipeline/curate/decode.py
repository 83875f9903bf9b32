"""Decoding in worker processes, and decoded images waiting on disk (the spill file)."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import images, parallel
from pipeline.backend import Backend
from pipeline.images import Reject

# Decoding: tasks of CHUNK images; at most IN_FLIGHT_PER_WORKER tasks per worker queued ahead.
CHUNK = 16
IN_FLIGHT_PER_WORKER = 3


# --- decoding in worker processes -----------------------------------------------------------------


def _read(payload: str | bytes) -> bytes | Reject:
    if isinstance(payload, bytes):
        return payload
    try:
        with open(payload, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return Reject("missing_file", f"{payload}: no such file")
    except OSError as err:
        return Reject("unreadable_file", f"{payload}: {err}")


def prepare(payload: str | bytes | None, size: int, quality: int) -> images.Prepared | Reject | None:
    """Worker: a file path or image bytes → Prepared, or the Reject with its reason."""
    if payload is None:
        return None
    data = _read(payload)
    if isinstance(data, Reject):
        return data
    try:
        return images.decode_and_prepare(data, size, quality)
    except images.ImageReject as err:
        return Reject(err.reason, err.message)


class Decoder:
    """`prepare` jobs over the backend's processes (pipeline.backend: local processes or Ray
    tasks): in job order, with a bounded window, so memory holds a few chunks and a consumer that
    stops early wastes at most the window. One local worker runs in this process; results are
    the same everywhere."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.slots = 1
        self._stack = contextlib.ExitStack()
        self._executor: Executor | None = None

    def __enter__(self) -> Decoder:
        self._executor, self.slots = self._stack.enter_context(self.backend.processes())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self._executor = None

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """(meta, payload) jobs → (meta, fn(payload)), in job order. Only payloads travel."""
        metas: deque = deque()

        def payloads() -> Iterator[Any]:
            for meta, payload in jobs:
                metas.append(meta)
                yield payload

        window = self.slots * IN_FLIGHT_PER_WORKER
        for result in parallel.ordered_map(fn, payloads(), self._executor, window, chunk=CHUNK):
            yield metas.popleft(), result


# --- decoded images waiting on disk ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """A prepared image in the spill file."""

    offset: int
    length: int
    width: int
    height: int
    original_width: int
    original_height: int
    content_hash: str


class Spill:
    """An append-only scratch file of JPEGs: selection keeps offsets, not images."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "w+b")
        self._end = 0

    def store(self, p: images.Prepared) -> Stored:
        self._file.seek(self._end)
        self._file.write(p.jpeg)
        stored = Stored(
            self._end, len(p.jpeg), p.width, p.height, p.original_width, p.original_height, p.content_hash
        )
        self._end += len(p.jpeg)
        return stored

    def load(self, s: Stored) -> bytes:
        self._file.seek(s.offset)
        return self._file.read(s.length)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

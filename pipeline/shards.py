"""WebDataset shards: tar files of samples, each sample the members `<key>.<ext>` that share a key.

ShardWriter writes byte-for-byte deterministic shards (the bytes depend only on the samples, their
order and max_count) and writes each one atomically: under a hidden temporary name, renamed to its
final name only once complete, so a crash never leaves a shard that looks whole. read_shard
streams a shard back one sample at a time and refuses a shard that is not whole: Python's tarfile
takes a tar cut at a member boundary (or inside a header) for a complete one, so the reader checks
the end-of-archive blocks itself. `verify_shards` checks a folder of shards against the manifest
that lists their samples, so that a short shard is named before any work is done.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from pipeline.errors import InputError

# WebDataset's key is the member name up to the first dot of its base name, so a key has no dot;
# no slash either (readers of flat shards take the base name). Extensions may have inner dots
# ("seg.png"), as in WebDataset.
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_EXT = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")

Field = bytes | str | dict | list

# A tar ends with two 512-byte blocks of zeros (every writer adds them when it closes the file).
END_OF_ARCHIVE = 1024


class ShardError(InputError):
    """A shard that cannot be read whole: unreadable, truncated, malformed or not the size its
    manifest says. The message names the shard and what is wrong with it."""


def encode_field(value: Field) -> bytes:
    """bytes as they are, str as UTF-8, dict and list as compact JSON with sorted keys."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raise TypeError(f"a field must be bytes, str, dict or list, got {type(value).__name__}")


class ShardWriter:
    """Samples to folder/<pattern.format(0)>, <pattern.format(1)>, ..., at most max_count per shard.

    Use as a context manager. `write` returns the file name of the shard the sample went to (for
    the caller's manifest). On a clean exit the last shard is finished; on an exception the
    unfinished shard's temporary file is removed and no file gets its name. Shards finished before
    the exception stay, each whole: a stage that must not leave a partial set of shards writes them
    into a temporary folder and renames the folder. A writer that got no sample writes no shard.

    Each shard's bytes are fixed: USTAR, mtime 0, uid/gid 0, no user/group names, mode 0o644, a
    sample's members in extension order. Keys must be unique within a shard; uniqueness across
    shards is the caller's (its manifest sees every key; this writer keeps only one shard's keys,
    so its memory does not grow with the dataset). A shard that already exists under its final
    name is an error: stale shards from an earlier run must not mix with new ones.
    """

    def __init__(self, folder: Path | str, *, max_count: int, pattern: str = "{:05d}.tar"):
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be a positive integer, got {max_count!r}")
        first, second = pattern.format(0), pattern.format(1)
        if first == second or "/" in first or os.sep in first or first.startswith("."):
            raise ValueError(
                f"pattern {pattern!r} must give a distinct plain file name per index, e.g. '{{:05d}}.tar'"
            )
        self.folder = Path(folder)
        self.max_count = max_count
        self.pattern = pattern
        self.paths: list[Path] = []  # finished shards, in order
        self._index = 0
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._keys: set[str] = set()
        self._closed = False

    def write(self, key: str, fields: Mapping[str, Field]) -> str:
        """Add one sample: `fields` maps extension ("jpg", "txt", "json") to its content (see
        encode_field). Returns the shard's file name, e.g. "00003.tar"."""
        if self._closed:
            raise ValueError("write to a closed ShardWriter")
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"key {key!r}: must be letters, digits, '_' or '-' (no dot, no slash)")
        if not fields:
            raise ValueError(f"key {key!r}: a sample needs at least one field")
        members = []
        for ext in sorted(fields):
            if not isinstance(ext, str) or not _EXT.fullmatch(ext):
                raise ValueError(f"key {key!r}: extension {ext!r} must be like 'jpg', 'txt' or 'seg.png'")
            try:
                members.append((f"{key}.{ext}", encode_field(fields[ext])))
            except TypeError as err:
                raise TypeError(f"key {key!r}, field {ext!r}: {err}") from None
        if self._tar is None or len(self._keys) >= self.max_count:
            self._finish()
            self._start()
        assert self._tar is not None and self._final is not None  # open from _start until _finish
        if key in self._keys:
            raise ValueError(f"key {key!r}: already written to {self._final.name}")
        self._keys.add(key)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        return self._final.name

    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / self.pattern.format(self._index)
        if final.exists():
            raise FileExistsError(f"{final}: already exists; remove the earlier output first")
        tmp = self.folder / f".{final.name}.tmp-{os.getpid()}"
        self._file = open(tmp, "wb")
        self._tmp, self._final = tmp, final
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._keys = set()

    def _finish(self) -> None:
        if self._tar is None:
            return
        assert self._file is not None and self._tmp is not None and self._final is not None  # set with _tar
        self._tar.close()  # end-of-archive blocks; does not close the file object it was given
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)
        self.paths.append(self._final)
        self._index += 1
        self._tar = self._file = self._tmp = self._final = None

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written, in order. Closing twice is harmless."""
        if not self._closed:
            self._finish()
            self._closed = True
        return list(self.paths)

    def abort(self) -> None:
        """Discard the unfinished shard (its temporary file); finished shards stay."""
        self._closed = True
        if self._file is not None:
            assert self._tmp is not None  # set with _file
            self._file.close()
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = self._final = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_shard(path: Path | str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a shard, in tar order, streaming: memory holds
    one sample. Keys follow WebDataset's rule (the member name up to the first dot of its base
    name). Raises ShardError, naming the shard, for a shard that is not a readable tar, one cut
    short (mid-member, or at a member boundary: no end-of-archive blocks), a member without an
    extension, a key whose members are not contiguous, or a repeated member. The samples before
    the fault have been yielded by then: a caller that must not act on a partial shard collects
    the shard's results before committing them (as parts.map does)."""
    path = Path(path)
    seen: set[str] = set()
    key: str | None = None
    sample: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                slash = member.name.rfind("/")
                dot = member.name.find(".", slash + 1)
                if dot <= slash + 1 or dot == len(member.name) - 1:
                    raise ShardError(f"{path}: member {member.name!r}: no key or no extension")
                name_key, ext = member.name[:dot], member.name[dot + 1 :]
                if name_key != key:
                    if key is not None:
                        yield key, sample
                    if name_key in seen:
                        raise ShardError(f"{path}: key {name_key!r}: its members are not contiguous")
                    seen.add(name_key)
                    key, sample = name_key, {}
                if ext in sample:
                    raise ShardError(f"{path}: key {key!r}: member .{ext} appears twice")
                data = tar.extractfile(member)
                assert data is not None  # a regular file member always has one
                sample[ext] = data.read()
            end = tar.offset
    except (tarfile.TarError, EOFError) as err:
        if key is None:
            raise ShardError(f"{path}: not a readable tar file: {err}") from None
        raise ShardError(
            f"{path}: truncated in sample {key!r} ({len(seen) - 1} whole sample(s) before it): {err}"
        ) from None
    if not ends_whole(path, end):
        after = f" after sample {key!r}" if key is not None else ""
        raise ShardError(
            f"{path}: truncated{after} (no end-of-archive blocks): a copy or download that stopped "
            f"part way, or a writer that was killed; {len(seen)} whole sample(s) before the cut"
        )
    if key is not None:
        yield key, sample


def ends_whole(path: Path, offset: int) -> bool:
    """Whether the tar file ends, at `offset` (where its last member's data ends), with the
    end-of-archive blocks."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(END_OF_ARCHIVE)
    return len(tail) == END_OF_ARCHIVE and not any(tail)


def count_samples(path: Path | str) -> int:
    """The number of samples (distinct keys) in a shard, from its member headers alone; a shard
    that is not whole is a ShardError as in read_shard."""
    path = Path(path)
    keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:  # seekable: member data is skipped, not read
            for member in tar:
                if member.isfile():
                    keys.add(member.name[: member.name.find(".", member.name.rfind("/") + 1)])
            end = tar.offset
    except tarfile.TarError as err:
        raise ShardError(f"{path}: truncated or not a readable tar file: {err}") from None
    if not ends_whole(path, end):
        raise ShardError(
            f"{path}: truncated (no end-of-archive blocks, or a member cut short) after {len(keys)} sample(s)"
        )
    return len(keys)


def verify_shards(folder: Path | str, manifest: Path | str) -> list[Path]:
    """The shards of `folder` (its *.tar, in name order), checked against `manifest` (a Parquet
    table with a `shard` column: one row per sample, the shard's path ending in its file name):
    every shard the manifest names exists, none it does not name, each holds exactly the samples
    it lists and ends whole. A ShardError names the first shard that does not."""
    import pyarrow.parquet as pq

    folder, manifest = Path(folder), Path(manifest)
    try:
        listed = pq.read_table(manifest, columns=["shard"]).column("shard").to_pylist()
    except (OSError, KeyError, ValueError) as err:
        raise ShardError(f"{manifest}: cannot read its shard column: {err}") from None
    expected: dict[str, int] = {}
    for name in listed:
        base = str(name).rsplit("/", 1)[-1]
        expected[base] = expected.get(base, 0) + 1
    shards = sorted(folder.glob("*.tar"))
    present = {s.name for s in shards}
    missing = sorted(set(expected) - present)
    if missing:
        raise ShardError(
            f"{folder}: shard {missing[0]} is missing ({manifest} lists {expected[missing[0]]} samples in it)"
        )
    extra = sorted(present - set(expected))
    if extra:
        raise ShardError(f"{folder / extra[0]}: not in {manifest} (a shard of another run?)")
    for shard in shards:
        n = count_samples(shard)
        if n != expected[shard.name]:
            raise ShardError(f"{shard}: holds {n} sample(s), {manifest} lists {expected[shard.name]}")
    return shards

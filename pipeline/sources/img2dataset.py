"""img2dataset's WebDataset output: <shard>.tar (key.jpg, key.txt, key.json per sample), with a
<shard>.parquet of every row it tried, failures included, and a <shard>_stats.json.

Shards are streamed member by member: memory holds one sample, never a shard. A shard cut short
(img2dataset killed mid-download, a copy that stopped) is read as far as it goes: its whole
samples come out as usual, then one `truncated` sample for the sample the cut went through and for
each key the shard's parquet lists as downloaded but the tar no longer holds, so the caller
records each as a reject instead of stopping the run.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.shards import ends_whole
from pipeline.sources._json import type_name
from pipeline.sources.errors import SourceError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True, slots=True)
class WebSample:
    shard: str  # the shard's stem: "00000" for 00000.tar (and 00000.parquet)
    key: str
    image: bytes | None  # None when the sample has no image member: the caller records a reject
    caption: str | None
    meta: dict = field(default_factory=dict)  # the .json member: img2dataset's row for this key
    truncated: str | None = None  # the shard was cut short here: why (no image or caption then)


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset's rule: the key is the basename up to its first dot, the extension the rest.
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext.lower()


class _Sample:
    """The members of one key, gathered while streaming."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.image: bytes | None = None
        self.caption: str | None = None
        self.meta: dict = {}

    def error(self, message: str) -> SourceError:
        return SourceError(f"{self.path}: key {self.key!r}: {message}")

    def add(self, ext: str, data: bytes) -> None:
        if ext in IMAGE_EXTENSIONS:
            if self.image is not None:
                raise self.error(f"a second image member (.{ext})")
            self.image = data
        elif ext == "txt":
            try:
                self.caption = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise self.error(f".txt: not UTF-8 text: {err}") from None
        elif ext == "json":
            try:
                meta = json.loads(data)
            except ValueError as err:
                raise self.error(f".json: not valid JSON: {err}") from None
            if not isinstance(meta, dict):
                raise self.error(f".json: expected an object, got {type_name(meta)}")
            self.meta = meta
        # Any other member (.npy, extra metadata) is not ours to read.

    def done(self) -> WebSample:
        return WebSample(self.path.stem, self.key, self.image, self.caption, self.meta)


def _iter_shard(path: Path) -> Iterator[WebSample]:
    seen: set[str] = set()
    current: _Sample | None = None
    cut: str | None = None
    try:
        # "r|*": a forward-only stream (compressed or not), so a shard is never held whole.
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current.done()
                    if key in seen:
                        raise SourceError(f"{path}: key {key!r}: its members are not contiguous")
                    seen.add(key)
                    current = _Sample(path, key)
                data = tar.extractfile(member)
                assert data is not None  # a regular file always has its data
                current.add(ext, data.read())
            end = tar.offset
        # tarfile takes a tar cut at a member boundary for a whole one; only a plain tar can be
        # checked for its end-of-archive blocks (a compressed one fails above when cut).
        if not _compressed(path) and not ends_whole(path, end):
            cut = "no end-of-archive blocks"
    except (tarfile.TarError, EOFError) as err:
        if not seen:
            raise SourceError(f"{path}: not a readable tar file: {err}") from None
        cut = str(err)
    if cut is None:
        if current is not None:
            yield current.done()
        return
    # The sample the cut went through may miss a member; every key the parquet says was
    # downloaded and the tar no longer holds is lost with it.
    lost = [current.key] if current is not None else []
    lost += sorted(_downloaded(path) - seen)
    why = f"{path.name}: the shard is cut short ({cut})"
    for key in lost:
        yield WebSample(path.stem, key, None, None, truncated=why)


def _compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


def _downloaded(shard: Path) -> set[str]:
    """Keys the shard's parquet lists with status success; none when it has no parquet (img2dataset
    writes it when a shard is finished, so a shard cut by a killed download often has none)."""
    path = shard.with_suffix(".parquet")
    if not path.is_file():
        return set()
    try:
        table = pq.read_table(path, columns=["key", "status"])
    except (pa.ArrowException, OSError, KeyError) as err:
        raise SourceError(f"{path}: not a readable parquet file with key and status: {err}") from None
    return {str(r["key"]) for r in table.to_pylist() if r["status"] == "success"}


def iter_shards(folder: Path | str) -> Iterator[WebSample]:
    """Every sample of folder/*.tar, shards in name order, samples in tar order."""
    for path in sorted(Path(folder).glob("*.tar")):
        yield from _iter_shard(path)


FAILURE_COLUMNS = ("key", "url", "status", "error_message")


def read_failures(folder: Path | str) -> list[dict]:
    """The rows of folder/*.parquet whose status is not "success": what img2dataset tried and
    could not fetch or resize, so the caller can record them as rejects. A shard without its
    parquet contributes nothing."""
    failures = []
    for path in sorted(Path(folder).glob("*.parquet")):
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as err:
            raise SourceError(f"{path}: not a readable parquet file: {err}") from None
        for column in FAILURE_COLUMNS:
            if column not in schema.names:
                raise SourceError(f"{path}: column {column!r}: missing")
        table = pq.read_table(path, columns=list(FAILURE_COLUMNS))
        for row in table.to_pylist():
            if row["status"] != "success":
                failures.append({"shard": path.stem, **row})
    return failures

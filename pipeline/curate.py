"""Curation: raw COCO / Flickr30k / Conceptual Captions into training shards, with the Karpathy
val and test images kept out; the Karpathy val and test sets and the zero-shot sets as evaluation
shards.

Output folder (written under a temporary name and renamed when complete):

    train/00000.tar …      WebDataset: <key>.jpg, <key>.txt (caption), <key>.json (metadata)
    train.parquet          one row per training pair: key, shard, source, id, caption, …
    val/coco/*.tar, val/coco.parquet             Karpathy val: every caption of every image;
    val/flickr30k/*.tar, val/flickr30k.parquet   where every choice is made (never on test)
    test/coco/*.tar, test/coco.parquet           Karpathy test: the same layout; the readout
    test/flickr30k/*.tar, test/flickr30k.parquet
    zeroshot/{imagenet,cifar10,cifar100}/*.tar, zeroshot/<name>.parquet, zeroshot/<name>.json
    rejects.parquet        everything refused or excluded: source, id, reason, detail

The leakage guard. Every image of the Karpathy val and test splits of COCO and Flickr30k is kept
out of training three ways: by COCO id (training candidates come from COCO's train2017 captions,
which hold most Karpathy test images), by Flickr file name, and by an exact hash of the decoded
pixels (the held-out images are decoded and hashed first; a training image from any source with
the same pixels is excluded). The same hash removes repeated images across and within training
sources: the first in processing order wins.

Selection. Each source's candidates are ranked by sha256(seed:source:id) and tried in rank order
until `count` pairs survive; a source with fewer survivors records its shortfall. Decoding runs
in a process pool with a bounded, order-preserving window, so the result does not depend on the
number of workers. Conceptual Captions is streamed: a pass over the shards keeps only the best
ranked keys (a bounded heap), a second pass decodes just those; decoded images wait in a spill
file on disk, never in memory. The kept pairs are written in a seeded shuffled order, so that
every training shard mixes the sources.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import multiprocessing
import re
import shutil
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from pipeline import images
from pipeline.captions import CaptionCheck, TokenCounter, check_captions, clean_caption
from pipeline.shards import ShardWriter
from pipeline.sources import (
    SourceError,
    index_images,
    iter_shards,
    read_captions,
    read_cifar,
    read_coco_test_karpathy,
    read_failures,
    read_flickr30k_test_karpathy,
    read_imagenet_val,
    read_karpathy,
    read_sugarcrepe,
)
from pipeline.sources.sugarcrepe import ProbeItem
from pipeline.tables import write_table

if TYPE_CHECKING:
    from pipeline.config import Curate, Sources

TRAIN_SOURCES = ("coco", "flickr30k", "cc")
ZEROSHOT_SETS = ("imagenet", "cifar10", "cifar100")

# Reasons that keep a usable image out on purpose; every other reason is a refusal of bad input.
EXCLUDED_REASONS = frozenset({"heldout_id", "heldout_filename", "heldout_hash", "duplicate"})

# Decoding: tasks of CHUNK images; at most IN_FLIGHT_PER_WORKER tasks per worker queued ahead.
CHUNK = 16
IN_FLIGHT_PER_WORKER = 3

# --- output schemas ----------------------------------------------------------------------------


def _s(name: str) -> pa.Field:
    return pa.field(name, pa.string(), nullable=False)


def _i(name: str) -> pa.Field:
    return pa.field(name, pa.int32(), nullable=False)


TRAIN_SCHEMA = pa.schema(
    [
        _s("key"),
        _s("shard"),
        _s("source"),
        _s("id"),
        _s("caption"),
        _s("image"),  # the image's key: pairs of one image share it (captions_per_image: all)
        _i("caption_index"),  # position of the caption among the image's original captions
        _i("width"),
        _i("height"),
    ]
)
TEST_SCHEMA = pa.schema(
    [
        _s("key"),
        _s("shard"),
        _s("id"),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        _i("width"),
        _i("height"),
    ]
)
ZEROSHOT_SCHEMA = pa.schema([_s("key"), _s("shard"), _s("id"), _i("label")])
PROBE_SCHEMA = pa.schema(
    [_s("category"), _s("index"), _s("key"), _s("shard"), _s("caption"), _s("negative_caption")]
)
REJECTS_SCHEMA = pa.schema([_s("source"), _s("id"), _s("reason"), _s("detail")])


# --- where the raw data is -----------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePaths:
    """Every raw input, resolved; `keys` names each by its params key for error messages."""

    coco_images: Path
    coco_train_annotations: Path
    coco_karpathy: Path
    flickr30k_images: Path
    flickr30k_karpathy: Path
    cc_shards: Path
    imagenet_val: Path
    cifar10: Path
    cifar100: Path
    sugarcrepe_annotations: Path
    sugarcrepe_images: Path
    coco_test: Path | None = None  # CLIP_benchmark's files, when the test sets come from them
    flickr30k_test: Path | None = None

    KEYS = {
        "coco_images": "sources.coco.images",
        "coco_train_annotations": "sources.coco.train_annotations",
        "coco_karpathy": "sources.karpathy.coco",
        "flickr30k_images": "sources.flickr30k.images",
        "flickr30k_karpathy": "sources.karpathy.flickr30k",
        "cc_shards": "sources.cc.shards",
        "imagenet_val": "sources.imagenet.val",
        "cifar10": "sources.cifar10.folder",
        "cifar100": "sources.cifar100.folder",
        "sugarcrepe_annotations": "sources.sugarcrepe.annotations",
        "sugarcrepe_images": "sources.sugarcrepe.images",
        "coco_test": "sources.karpathy.coco_test",
        "flickr30k_test": "sources.karpathy.flickr30k_test",
    }

    @classmethod
    def resolve(cls, sources: Sources, base_dir: Path | str) -> SourcePaths:
        base = Path(base_dir)
        karpathy = base / sources.karpathy.folder
        return cls(
            coco_images=base / sources.coco.images,
            coco_train_annotations=base / sources.coco.train_annotations,
            coco_karpathy=karpathy / sources.karpathy.coco,
            flickr30k_images=base / sources.flickr30k.images,
            flickr30k_karpathy=karpathy / sources.karpathy.flickr30k,
            cc_shards=base / sources.cc.shards,
            imagenet_val=base / sources.imagenet.val,
            cifar10=base / sources.cifar10.folder,
            cifar100=base / sources.cifar100.folder,
            sugarcrepe_annotations=base / sources.sugarcrepe.annotations,
            sugarcrepe_images=base / sources.sugarcrepe.images,
            coco_test=karpathy / sources.karpathy.coco_test if sources.karpathy.coco_test else None,
            flickr30k_test=(
                karpathy / sources.karpathy.flickr30k_test if sources.karpathy.flickr30k_test else None
            ),
        )

    def missing(self) -> list[tuple[str, Path]]:
        """(params key, path) of every input that does not exist."""
        paths = ((key, getattr(self, name)) for name, key in self.KEYS.items())
        return [(key, path) for key, path in paths if path is not None and not path.exists()]


# --- ranks, keys, captions -------------------------------------------------------------------------


def rank(seed: int, source: str, image_id: str) -> str:
    """A candidate's place in its source's processing order: fixed by seed, source and id."""
    return hashlib.sha256(f"{seed}:{source}:{image_id}".encode()).hexdigest()


def pick_caption(seed: int, source: str, image_id: str, n: int) -> int:
    """Which of an image's n usable captions it is paired with (captions_per_image: 1)."""
    digest = hashlib.sha256(f"{seed}:caption:{source}:{image_id}".encode()).hexdigest()
    return int(digest, 16) % n


_STEM = re.compile(r"[A-Za-z0-9_]+")


def key_stem(image_id: str) -> str:
    """The id as a WebDataset key part: the file stem when it is plain letters, digits and '_'
    ("1000092795.jpg" → "1000092795"), otherwise a short hash of the whole id."""
    stem = image_id.rsplit("/", 1)[-1].split(".", 1)[0]
    if _STEM.fullmatch(stem):
        return stem
    return "h" + hashlib.sha1(image_id.encode()).hexdigest()[:16]


class KeyRegistry:
    """Unique keys per output set: a stem already taken by another id falls back to a hash."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    def key(self, prefix: str, image_id: str, stem: str | None = None) -> str:
        key = f"{prefix}-{stem if stem is not None else key_stem(image_id)}"
        if self._owner.setdefault(key, image_id) != image_id:
            key = f"{prefix}-h{hashlib.sha1(image_id.encode()).hexdigest()[:16]}"
            if self._owner.setdefault(key, image_id) != image_id:  # pragma: no cover - sha1 collision
                raise ValueError(f"key collision for {prefix} id {image_id!r}")
        return key


# --- decoding in worker processes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    detail: str


def _read(payload: str | bytes) -> bytes | Refusal:
    if isinstance(payload, bytes):
        return payload
    try:
        with open(payload, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return Refusal("missing_file", f"{payload}: no such file")
    except OSError as err:
        return Refusal("unreadable_file", f"{payload}: {err}")


def prepare(payload: str | bytes | None, size: int, quality: int) -> images.Prepared | Refusal | None:
    """Worker: a file path or image bytes → Prepared, or the Refusal with its reason."""
    if payload is None:
        return None
    data = _read(payload)
    if isinstance(data, Refusal):
        return data
    try:
        return images.decode_and_prepare(data, size, quality)
    except images.ImageReject as err:
        return Refusal(err.reason, err.message)


def _run_chunk(fn: Callable[[Any], Any], payloads: list[Any]) -> list[Any]:
    return [fn(p) for p in payloads]


class Decoder:
    """An order-preserving map over a process pool with a bounded window: the input iterator is
    pulled only as results are taken, so memory holds a few chunks, and a consumer that stops
    early wastes at most the window. workers=1 runs in this process; results are the same."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def __enter__(self) -> Decoder:
        if self.workers > 1:
            # spawn, not fork: the caller may have started threads (torch, BLAS) before us.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """(meta, payload) jobs → (meta, fn(payload)), in job order. Only payloads travel."""
        it = iter(jobs)
        if self._pool is None:
            for meta, payload in it:
                yield meta, fn(payload)
            return
        pending: deque = deque()
        limit = self.workers * IN_FLIGHT_PER_WORKER
        while chunk := list(islice(it, CHUNK)):
            metas = [m for m, _ in chunk]
            pending.append((metas, self._pool.apply_async(_run_chunk, (fn, [p for _, p in chunk]))))
            del chunk
            if len(pending) >= limit:
                metas, result = pending.popleft()
                yield from zip(metas, result.get())
        while pending:
            metas, result = pending.popleft()
            yield from zip(metas, result.get())


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


# --- the ledger of refusals --------------------------------------------------------------------


class Ledger:
    """rejects.parquet's rows, kept column-wise, and their counts per source and reason."""

    def __init__(self) -> None:
        self.columns: dict[str, list[str]] = {name: [] for name in REJECTS_SCHEMA.names}
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def refuse(self, source: str, image_id: str, reason: str, detail: str) -> None:
        for name, value in zip(REJECTS_SCHEMA.names, (source, image_id, reason, detail)):
            self.columns[name].append(value)
        self.counts[source][reason] += 1

    def split(self, source: str) -> tuple[dict[str, int], dict[str, int]]:
        """(excluded, rejected) counts of one source, reasons sorted."""
        counts = self.counts.get(source, Counter())
        excluded = {r: n for r, n in sorted(counts.items()) if r in EXCLUDED_REASONS}
        rejected = {r: n for r, n in sorted(counts.items()) if r not in EXCLUDED_REASONS}
        return excluded, rejected

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=REJECTS_SCHEMA)


# --- training selection ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    source: str
    id: str
    stem: str  # key part
    captions: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Pair:
    key: str
    image: str
    source: str
    id: str
    caption_index: int
    caption: str
    stored: Stored


@dataclass
class SourceStats:
    asked: int
    candidates: int = 0
    tried: int = 0
    images: int = 0
    pairs: int = 0


@dataclass
class Selection:
    """Selection state shared by the training sources: held-out and kept hashes, kept pairs."""

    seed: int
    captions_per_image: int | str
    count_tokens: TokenCounter
    max_tokens: int
    ledger: Ledger
    spill: Spill
    heldout: dict[str, str] = field(default_factory=dict)  # content hash → which held-out image
    kept_hashes: dict[str, str] = field(default_factory=dict)  # content hash → kept image key
    pairs: list[Pair] = field(default_factory=list)
    stats: dict[str, SourceStats] = field(default_factory=dict)
    keys: KeyRegistry = field(default_factory=KeyRegistry)

    def check(self, cand: Candidate) -> CaptionCheck:
        return check_captions(cand.captions, self.count_tokens, self.max_tokens)

    def need(self, source: str) -> int:
        st = self.stats[source]
        return st.asked - st.pairs

    def take(
        self, cand: Candidate, check: CaptionCheck, result: images.Prepared | Stored | Refusal | None
    ) -> None:
        """Decide one candidate, in rank order: record its refusals, or keep it."""
        source, ledger = cand.source, self.ledger
        st = self.stats[source]
        st.tried += 1
        for ref in check.refused:
            ledger.refuse(source, cand.id, ref.reason, ref.detail)
        if not check.kept:
            ledger.refuse(
                source, cand.id, "no_valid_caption", f"none of {len(cand.captions)} captions usable"
            )
            return
        if isinstance(result, Refusal):
            ledger.refuse(source, cand.id, result.reason, result.detail)
            return
        if result is None:  # pragma: no cover - a job with captions always gets a payload or refusal
            raise AssertionError(f"{source} {cand.id}: no decode result")
        digest = result.content_hash
        if digest in self.heldout:
            ledger.refuse(source, cand.id, "heldout_hash", f"same pixels as {self.heldout[digest]}")
            return
        if digest in self.kept_hashes:
            ledger.refuse(source, cand.id, "duplicate", f"same pixels as {self.kept_hashes[digest]}")
            return
        stored = self.spill.store(result) if isinstance(result, images.Prepared) else result
        image_key = self.keys.key(source, cand.id, cand.stem)
        self.kept_hashes[digest] = image_key
        if self.captions_per_image == 1:
            chosen = [check.kept[pick_caption(self.seed, source, cand.id, len(check.kept))]]
        else:
            chosen = list(check.kept[: self.need(source)])
        for index, text in chosen:
            self.pairs.append(Pair(f"{image_key}-{index}", image_key, source, cand.id, index, text, stored))
        st.images += 1
        st.pairs += len(chosen)


def _select_listed(
    sel: Selection, decoder: Decoder, fn: Callable, ranked: list[tuple[Candidate, str | None]], progress: bool
) -> None:
    """COCO and Flickr30k: candidates listed up front (path or None when the file is missing),
    tried in rank order until the source's count is met."""
    if not ranked:
        return
    source = ranked[0][0].source
    if sel.need(source) <= 0:
        return

    def jobs() -> Iterator[tuple[Any, Any]]:
        for cand, path in ranked:
            check = sel.check(cand)
            if not check.kept:
                yield (cand, check, None), None
            elif path is None:
                missing = Refusal("missing_file", f"no image file for id {cand.id}")
                yield (cand, check, missing), None
            else:
                yield (cand, check, None), str(path)

    bar = tqdm(total=sel.stats[source].asked, desc=f"curate {source}", disable=not progress, leave=False)
    with bar:
        for (cand, check, refusal), result in decoder.map(fn, jobs()):
            before = sel.stats[source].pairs
            sel.take(cand, check, refusal or result)
            bar.update(sel.stats[source].pairs - before)
            if sel.need(source) <= 0:
                break


def _select_cc(sel: Selection, decoder: Decoder, fn: Callable, folder: Path, progress: bool) -> None:
    """Conceptual Captions from img2dataset shards, streamed in rounds. Each round: pass 1 keeps
    the best-ranked keys not yet tried (a heap of the window's size), pass 2 decodes just those
    into the spill file, then they are decided in rank order. One round suffices unless more than
    the margin is refused."""
    source, ledger, st = "cc", sel.ledger, sel.stats["cc"]
    for row in read_failures(folder):
        ledger.refuse(source, row["key"], row["status"], f"{row['shard']}.parquet: {row['error_message']}")
        st.candidates += 1
    if st.asked == 0:
        return
    cutoff: str | None = None
    first = True
    while sel.need(source) > 0:
        need = sel.need(source)
        window_size = need + need // 8 + 16

        def ranked(first: bool = first, cutoff: str | None = cutoff) -> Iterator[tuple[str, str]]:
            for sample in iter_shards(folder):
                if first:
                    st.candidates += 1
                if sample.image is None:
                    if first:
                        ledger.refuse(source, sample.key, "no_image", f"{sample.shard}.tar: no image member")
                    continue
                r = rank(sel.seed, source, sample.key)
                if cutoff is None or r > cutoff:
                    yield r, sample.key

        window = heapq.nsmallest(window_size, ranked())
        first = False
        if not window:
            break
        wanted = {key for _, key in window}
        found: dict[str, tuple[Candidate, CaptionCheck, Any]] = {}

        def jobs(wanted: set[str] = wanted, found: dict = found) -> Iterator[tuple[Any, Any]]:
            for sample in iter_shards(folder):
                if sample.key not in wanted:
                    continue
                if sample.key in found:
                    ledger.refuse(source, sample.key, "duplicate_key", f"{sample.shard}.tar: key seen before")
                    continue
                cand = Candidate(source, sample.key, key_stem(sample.key), (sample.caption,))
                check = sel.check(cand)
                found[sample.key] = (cand, check, None)
                yield (cand, check), sample.image if check.kept else None

        desc = f"curate cc (decode {len(window)})"
        for (cand, check), result in tqdm(
            decoder.map(fn, jobs()), total=len(window), desc=desc, disable=not progress, leave=False
        ):
            stored = sel.spill.store(result) if isinstance(result, images.Prepared) else result
            found[cand.id] = (cand, check, stored)
        decided: set[str] = set()
        for r, key in window:
            if key in decided:  # the same key in two shards: the second was refused above
                continue
            if key not in found:
                raise SourceError(f"{folder}: key {key!r} was read once and then not found")
            decided.add(key)
            cand, check, result = found.pop(key)
            sel.take(cand, check, result)
            if sel.need(source) <= 0:
                return
            cutoff = r
        if len(window) < window_size:
            break


# --- held-out and test sets -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldOut:
    id: str
    stem: str
    split: str  # "val" or "test"
    path: Path | None
    captions: tuple[str, ...]


def _coco_heldout(path: Path, index: dict[int, Path]) -> tuple[set[int], list[HeldOut]]:
    ids, items = set(), []
    for i, im in enumerate(read_karpathy(path)):
        if im.cocoid is None:
            raise SourceError(
                f"{path}: images[{i}].cocoid: missing (a COCO Karpathy file names each COCO id)"
            )
        if im.split in ("val", "test"):
            ids.add(im.cocoid)
            items.append(
                HeldOut(str(im.cocoid), f"{im.cocoid:012d}", im.split, index.get(im.cocoid), im.captions)
            )
    return ids, items


_COCO_ID = re.compile(r"(\d+)\.jpe?g$", re.IGNORECASE)


def _coco_test_file(path: Path, index: dict[int, Path]) -> list[HeldOut]:
    """The COCO test set from CLIP_benchmark's file; images are found by the COCO id in their
    2014 file name, in whichever COCO image folders exist."""
    items = []
    for i, im in enumerate(read_coco_test_karpathy(path)):
        found = _COCO_ID.search(im.filename)
        if found is None:
            raise SourceError(f"{path}: images[{i}].file_name: no COCO id in {im.filename!r}")
        cocoid = int(found.group(1))
        items.append(HeldOut(str(cocoid), f"{cocoid:012d}", "test", index.get(cocoid), im.captions))
    return items


def _flickr_test_file(path: Path, folder: Path) -> list[HeldOut]:
    return [
        HeldOut(im.filename, key_stem(im.filename), "test", folder / im.filename, im.captions)
        for im in read_flickr30k_test_karpathy(path)
    ]


def _replace_test(items: list[HeldOut], test: list[HeldOut]) -> list[HeldOut]:
    """Karpathy's val images, then the given test set (whose images are held out as well)."""
    return [h for h in items if h.split == "val"] + test


def _flickr_heldout(path: Path, folder: Path) -> tuple[list, list[HeldOut]]:
    everything, items = read_karpathy(path), []
    for im in everything:
        if im.split in ("val", "test"):
            items.append(
                HeldOut(im.filename, key_stem(im.filename), im.split, folder / im.filename, im.captions)
            )
    return everything, items


def _write_heldout(
    name: str,
    items: list[HeldOut],
    out: Path,
    decoder: Decoder,
    cfg: Curate,
    sel: Selection,
    progress: bool,
) -> dict[str, dict[str, int]]:
    """Decode every held-out image, hash it (the leakage guard) and write it with every caption:
    Karpathy val to val/<name>/ (where choices are made) and test to test/<name>/ (the readout).
    Returns each split's counts."""
    return {
        split: _write_eval_split(
            name, split, [h for h in items if h.split == split], out, decoder, cfg, sel, progress
        )
        for split in ("val", "test")
    }


def _write_eval_split(
    name: str,
    split: str,
    items: list[HeldOut],
    out: Path,
    decoder: Decoder,
    cfg: Curate,
    sel: Selection,
    progress: bool,
) -> dict[str, int]:
    ledger = sel.ledger
    prep = partial(prepare, size=cfg.image_size, quality=cfg.jpeg_quality)
    source = f"{name}_{split}"
    keys = KeyRegistry()

    def jobs() -> Iterator[tuple[Any, Any]]:
        for h in items:
            cleaned = [clean_caption(raw) for raw in h.captions]
            captions = [text for text in cleaned if text]
            # Decoded even without a usable caption: its hash still guards the training data.
            yield (h, cleaned, captions), (str(h.path) if h.path is not None else None)

    rows, n_captions = [], 0
    with ShardWriter(out / split / name, max_count=cfg.shard_size) as writer:
        for (h, cleaned, captions), result in tqdm(
            decoder.map(prep, jobs()),
            total=len(items),
            desc=f"{name} {split}",
            disable=not progress,
            leave=False,
        ):
            # Refusals are recorded here, in order, not when a job is queued: the rejects table
            # must not depend on how far ahead the pool reads.
            if isinstance(result, images.Prepared):
                sel.heldout.setdefault(result.content_hash, f"{name} {split} {h.id}")
            for j, text in enumerate(cleaned):
                if not text:
                    ledger.refuse(source, h.id, "caption_empty", f"caption {j}: {h.captions[j]!r}")
            if not captions:
                ledger.refuse(source, h.id, "no_valid_caption", f"none of {len(h.captions)} captions usable")
                continue
            if result is None:
                ledger.refuse(source, h.id, "missing_file", f"no image file for {h.id}")
                continue
            if isinstance(result, Refusal):
                ledger.refuse(source, h.id, result.reason, result.detail)
                continue
            key = keys.key(name, h.id, h.stem)
            meta = {
                "source": name,
                "id": h.id,
                "captions": captions,
                "original_width": result.original_width,
                "original_height": result.original_height,
                "width": result.width,
                "height": result.height,
            }
            shard = writer.write(key, {"jpg": result.jpeg, "txt": "\n".join(captions), "json": meta})
            rows.append(
                {
                    "key": key,
                    "shard": f"{split}/{name}/{shard}",
                    "id": h.id,
                    "captions": captions,
                    "width": result.width,
                    "height": result.height,
                }
            )
            n_captions += len(captions)
    write_table(out / split / f"{name}.parquet", rows, TEST_SCHEMA)
    return {
        "images": len(rows),
        "captions": n_captions,
        "listed": len(items),
        "rejected": ledger.split(source)[1],
    }


# --- the compositional probe -------------------------------------------------------------------------


def _write_probe(
    items: list[ProbeItem],
    folder: Path,
    out: Path,
    decoder: Decoder,
    cfg: Curate,
    sel: Selection,
    progress: bool,
) -> dict[str, Any]:
    """SugarCrepe's images (each once, however many items name it) as shards, and its items as a
    table; an item whose image is missing or unreadable is refused with the image."""
    ledger, keys = sel.ledger, KeyRegistry()
    names = list(dict.fromkeys(i.filename for i in items))
    prep = partial(prepare, size=cfg.image_size, quality=cfg.jpeg_quality)
    jobs = ((name, str(folder / name) if (folder / name).is_file() else None) for name in names)
    where: dict[str, tuple[str, str]] = {}
    with ShardWriter(out / "probe" / "sugarcrepe", max_count=cfg.shard_size) as writer:
        for name, result in tqdm(
            decoder.map(prep, jobs), total=len(names), desc="sugarcrepe", disable=not progress, leave=False
        ):
            if result is None:
                ledger.refuse("sugarcrepe", name, "missing_file", f"no image file {folder / name}")
                continue
            if isinstance(result, Refusal):
                ledger.refuse("sugarcrepe", name, result.reason, result.detail)
                continue
            sel.heldout.setdefault(result.content_hash, f"sugarcrepe {name}")
            key = keys.key("sugarcrepe", name)
            meta = {"source": "sugarcrepe", "id": name, "width": result.width, "height": result.height}
            shard = writer.write(key, {"jpg": result.jpeg, "json": meta})
            where[name] = (key, f"probe/sugarcrepe/{shard}")
    rows = [
        {
            "category": i.category,
            "index": i.index,
            "key": where[i.filename][0],
            "shard": where[i.filename][1],
            "caption": i.caption,
            "negative_caption": i.negative_caption,
        }
        for i in items
        if i.filename in where
    ]
    write_table(out / "probe" / "sugarcrepe.parquet", rows, PROBE_SCHEMA)
    return {
        "images": len(where),
        "items": dict(sorted(Counter(r["category"] for r in rows).items())),
        "items_dropped": len(items) - len(rows),
        "rejected": ledger.split("sugarcrepe")[1],
    }


# --- zero-shot sets ---------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_zeroshot(
    name: str,
    classnames: list[str],
    samples: Iterator[tuple[str, int, Any]],
    n: int,
    out: Path,
    shard_size: int,
    ledger: Ledger,
    progress: bool,
) -> dict[str, int]:
    """samples: (id, label, (ext, bytes, meta) or Refusal) in order."""
    keys, rows = KeyRegistry(), []
    with ShardWriter(out / "zeroshot" / name, max_count=shard_size) as writer:
        for image_id, label, result in tqdm(samples, total=n, desc=name, disable=not progress, leave=False):
            if isinstance(result, Refusal):
                ledger.refuse(name, image_id, result.reason, result.detail)
                continue
            ext, data, meta = result
            key = keys.key(name, image_id)
            meta = {"source": name, "id": image_id, "label": label, "classname": classnames[label], **meta}
            shard = writer.write(key, {ext: data, "cls": str(label), "json": meta})
            rows.append({"key": key, "shard": f"zeroshot/{name}/{shard}", "id": image_id, "label": label})
    write_table(out / "zeroshot" / f"{name}.parquet", rows, ZEROSHOT_SCHEMA)
    _write_json(out / "zeroshot" / f"{name}.json", {"classnames": classnames})
    return {"images": len(rows), "classes": len(classnames), "rejected": ledger.split(name)[1]}


def _imagenet(
    paths: SourcePaths, decoder: Decoder, cfg: Curate, out: Path, ledger: Ledger, progress: bool
) -> dict[str, int]:
    classnames, samples = read_imagenet_val(paths.imagenet_val)
    prep = partial(prepare, size=cfg.image_size, quality=cfg.jpeg_quality)
    jobs = (((f"{p.parent.name}/{p.name}", label), str(p)) for p, label in samples)

    def results() -> Iterator[tuple[str, int, Any]]:
        for (image_id, label), r in decoder.map(prep, jobs):
            if isinstance(r, Refusal):
                yield image_id, label, r
            else:
                sizes = {
                    "original_width": r.original_width,
                    "original_height": r.original_height,
                    "width": r.width,
                    "height": r.height,
                }
                yield image_id, label, ("jpg", r.jpeg, sizes)

    return _write_zeroshot(
        "imagenet", classnames, results(), len(samples), out, cfg.shard_size, ledger, progress
    )


def encode_png(pixels: Any) -> bytes:
    """Lossless: a CIFAR image is 32×32 and stays as it was given (PIL's PNG has no timestamp)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _cifar(name: str, folder: Path, cfg: Curate, out: Path, ledger: Ledger, progress: bool) -> dict[str, int]:
    classnames, pixels, labels = read_cifar(folder, name, "test")

    def results() -> Iterator[tuple[str, int, Any]]:
        h, w = pixels.shape[1:3]
        sizes = {"original_width": w, "original_height": h, "width": w, "height": h}
        for i, label in enumerate(labels):
            yield f"{i:05d}", label, ("png", encode_png(pixels[i]), sizes)

    return _write_zeroshot(name, classnames, results(), len(labels), out, cfg.shard_size, ledger, progress)


# --- the whole stage ----------------------------------------------------------------------------------


def pair_order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:order:{key}".encode()).hexdigest()


def _write_train(sel: Selection, out: Path, shard_size: int, progress: bool) -> int:
    """The kept pairs in a seeded shuffled order (every shard mixes the sources)."""
    order = sorted(sel.pairs, key=lambda p: pair_order(sel.seed, p.key))
    rows = []
    with ShardWriter(out / "train", max_count=shard_size) as writer:
        for p in tqdm(order, desc="train shards", disable=not progress, leave=False):
            s = p.stored
            meta = {
                "source": p.source,
                "id": p.id,
                "caption": p.caption,
                "original_width": s.original_width,
                "original_height": s.original_height,
                "width": s.width,
                "height": s.height,
            }
            shard = writer.write(p.key, {"jpg": sel.spill.load(s), "txt": p.caption, "json": meta})
            rows.append(
                {
                    "key": p.key,
                    "shard": f"train/{shard}",
                    "source": p.source,
                    "id": p.id,
                    "caption": p.caption,
                    "image": p.image,
                    "caption_index": p.caption_index,
                    "width": s.width,
                    "height": s.height,
                }
            )
        shards = len(writer.close())
    write_table(out / "train.parquet", rows, TRAIN_SCHEMA)
    return shards


def curate(
    cfg: Curate,
    paths: SourcePaths,
    out: Path | str,
    count_tokens: TokenCounter,
    max_tokens: int,
    progress: bool = True,
) -> dict:
    """Run the whole curation into `out` (replaced atomically); returns the metrics.

    Raises SourceError for a malformed raw file (naming the file and key); bad images and
    captions are refused and recorded, never raised."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ledger = Ledger()
    spill = Spill(tmp / ".spill")
    mix = {"coco": cfg.mix.coco, "flickr30k": cfg.mix.flickr30k, "cc": cfg.mix.cc}
    sel = Selection(
        seed=cfg.seed,
        captions_per_image=cfg.captions_per_image,
        count_tokens=count_tokens,
        max_tokens=max_tokens,
        ledger=ledger,
        spill=spill,
        stats={s: SourceStats(asked=mix[s]) for s in TRAIN_SOURCES},
    )
    prep = partial(prepare, size=cfg.image_size, quality=cfg.jpeg_quality)
    try:
        # Raw annotations first: a malformed file fails the run before any decoding.
        coco_index = index_images(paths.coco_images)
        coco_heldout_ids, coco_heldout = _coco_heldout(paths.coco_karpathy, coco_index)
        flickr_all, flickr_heldout = _flickr_heldout(paths.flickr30k_karpathy, paths.flickr30k_images)
        if paths.coco_test is not None:
            coco_heldout = _replace_test(coco_heldout, _coco_test_file(paths.coco_test, coco_index))
            coco_heldout_ids |= {int(h.id) for h in coco_heldout}
        if paths.flickr30k_test is not None:
            flickr_heldout = _replace_test(
                flickr_heldout, _flickr_test_file(paths.flickr30k_test, paths.flickr30k_images)
            )
        flickr_out = {h.id: h.split for h in flickr_heldout}
        coco_train = read_captions(paths.coco_train_annotations)
        probe_items = read_sugarcrepe(paths.sugarcrepe_annotations)
        with Decoder(cfg.workers) as decoder:
            heldout = {
                "coco": _write_heldout("coco", coco_heldout, tmp, decoder, cfg, sel, progress),
                "flickr30k": _write_heldout("flickr30k", flickr_heldout, tmp, decoder, cfg, sel, progress),
            }
            val = {name: splits["val"] for name, splits in heldout.items()}
            test = {name: splits["test"] for name, splits in heldout.items()}
            # Which file each set came from: Karpathy's JSON or CLIP_benchmark's (test only).
            val["coco"]["annotations"] = paths.coco_karpathy.name
            val["flickr30k"]["annotations"] = paths.flickr30k_karpathy.name
            test["coco"]["annotations"] = (paths.coco_test or paths.coco_karpathy).name
            test["flickr30k"]["annotations"] = (paths.flickr30k_test or paths.flickr30k_karpathy).name
            probe = _write_probe(probe_items, paths.sugarcrepe_images, tmp, decoder, cfg, sel, progress)
            # COCO: train2017 (or train2014) captions, Karpathy val/test ids out.
            split_of = {int(h.id): h.split for h in coco_heldout}
            ranked = []
            for cocoid, im in coco_train.items():
                image_id = str(cocoid)
                if cocoid in coco_heldout_ids:
                    split = split_of.get(cocoid, "test")  # a test id only the Karpathy JSON lists
                    ledger.refuse("coco", image_id, "heldout_id", f"Karpathy {split} image")
                    continue
                cand = Candidate("coco", image_id, f"{cocoid:012d}", im.captions)
                ranked.append((rank(cfg.seed, "coco", image_id), cand, coco_index.get(cocoid)))
            sel.stats["coco"].candidates = len(coco_train)
            ranked.sort(key=lambda t: t[0])
            _select_listed(sel, decoder, prep, [(c, p) for _, c, p in ranked], progress)
            # Flickr30k: every Karpathy image; val and test out by file name.
            ranked = []
            for im in flickr_all:
                if im.split in ("val", "test") or im.filename in flickr_out:
                    split = im.split if im.split in ("val", "test") else flickr_out[im.filename]
                    ledger.refuse("flickr30k", im.filename, "heldout_filename", f"Karpathy {split} image")
                    continue
                cand = Candidate("flickr30k", im.filename, key_stem(im.filename), im.captions)
                ranked.append(
                    (rank(cfg.seed, "flickr30k", im.filename), cand, paths.flickr30k_images / im.filename)
                )
            sel.stats["flickr30k"].candidates = len(flickr_all)
            ranked.sort(key=lambda t: t[0])
            _select_listed(sel, decoder, prep, [(c, p) for _, c, p in ranked], progress)
            # Conceptual Captions: streamed.
            _select_cc(sel, decoder, prep, paths.cc_shards, progress)
            train_shards = _write_train(sel, tmp, cfg.shard_size, progress)
            zeroshot = {"imagenet": _imagenet(paths, decoder, cfg, tmp, ledger, progress)}
        zeroshot["cifar10"] = _cifar("cifar10", paths.cifar10, cfg, tmp, ledger, progress)
        zeroshot["cifar100"] = _cifar("cifar100", paths.cifar100, cfg, tmp, ledger, progress)
        write_table(tmp / "rejects.parquet", ledger.table(), REJECTS_SCHEMA)
    except BaseException:
        spill.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    spill.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {**_metrics(sel, ledger, val, test, zeroshot, train_shards), "probe": {"sugarcrepe": probe}}


def _metrics(
    sel: Selection, ledger: Ledger, val: dict, test: dict, zeroshot: dict, train_shards: int
) -> dict:
    train: dict[str, Any] = {}
    for source in TRAIN_SOURCES:
        st = sel.stats[source]
        excluded, rejected = ledger.split(source)
        train[source] = {
            "asked": st.asked,
            "kept_pairs": st.pairs,
            "kept_images": st.images,
            "shortfall": st.asked - st.pairs,
            "candidates": st.candidates,
            "tried": st.tried,
            "excluded": excluded,
            "rejected": rejected,
        }
    train["total"] = {
        "pairs": len(sel.pairs),
        "images": sum(sel.stats[s].images for s in TRAIN_SOURCES),
        "shards": train_shards,
    }
    return {
        "train": train,
        "val": val,
        "test": test,
        "heldout": {"hashes": len(sel.heldout)},
        "zeroshot": zeroshot,
    }

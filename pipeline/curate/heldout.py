"""The held-out sets: Karpathy val and test of COCO and Flickr30k, written as evaluation shards
and hashed so that no training image repeats them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import evalsets, images
from pipeline.captions import clean_caption
from pipeline.curate.decode import Decoder, prepare
from pipeline.curate.keys import KeyRegistry, key_stem
from pipeline.curate.selection import Selection
from pipeline.curate.settings import Settings
from pipeline.curate.tables import TEST_SCHEMA
from pipeline.images import Reject
from pipeline.shards import ShardWriter
from pipeline.sources import (
    SourceError,
    read_coco_test_karpathy,
    read_flickr30k_test_karpathy,
    read_karpathy,
)
from pipeline.tables import write_table

# --- held-out and test sets -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldOut:
    id: str
    stem: str
    split: str  # "val" or "test"
    path: Path | None
    captions: tuple[str, ...]


def read_coco_heldout(path: Path, index: dict[int, Path]) -> tuple[set[int], list[HeldOut]]:
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


def coco_test_file(path: Path, index: dict[int, Path]) -> list[HeldOut]:
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


def flickr_test_file(path: Path, folder: Path) -> list[HeldOut]:
    return [
        HeldOut(im.filename, key_stem(im.filename), "test", folder / im.filename, im.captions)
        for im in read_flickr30k_test_karpathy(path)
    ]


def replace_test(items: list[HeldOut], test: list[HeldOut]) -> list[HeldOut]:
    """Karpathy's val images, then the given test set (whose images are held out as well)."""
    return [h for h in items if h.split == "val"] + test


def read_flickr_heldout(path: Path, folder: Path) -> tuple[list, list[HeldOut]]:
    everything, items = read_karpathy(path), []
    for im in everything:
        if im.split in ("val", "test"):
            items.append(
                HeldOut(im.filename, key_stem(im.filename), im.split, folder / im.filename, im.captions)
            )
    return everything, items


def write_heldout(
    name: str,
    items: list[HeldOut],
    out: Path,
    decoder: Decoder,
    cfg: Settings,
    sel: Selection,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Decode every held-out image, hash it (the leakage guard) and write it with every caption:
    Karpathy val to eval/<name>/val/ (where choices are made), test to eval/<name>/test/ (the
    readout), in CLIP_benchmark's layout for retrieval (pipeline/evalsets.py).
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
    cfg: Settings,
    sel: Selection,
    progress: bool,
) -> dict[str, Any]:
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
    folder = evalsets.shard_dir(out, name, split)
    with ShardWriter(folder, max_count=cfg.shard_size, pattern=evalsets.SHARD_PATTERN) as writer:
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
            if isinstance(result, Reject):
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
                    "shard": evalsets.shard_path(name, split, shard),
                    "id": h.id,
                    "captions": captions,
                    "width": result.width,
                    "height": result.height,
                }
            )
            n_captions += len(captions)
        shards = writer.close()
    evalsets.write_shard_count(folder, shards)
    (evalsets.set_dir(out, name) / evalsets.DATASET_TYPE).write_text("retrieval\n", encoding="utf-8")
    write_table(evalsets.set_dir(out, name) / f"{split}.parquet", rows, TEST_SCHEMA)
    return {
        "images": len(rows),
        "captions": n_captions,
        "listed": len(items),
        "rejected": ledger.split(source)[1],
    }

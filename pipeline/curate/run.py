"""The whole curate stage: held-out sets first, then the training selection, then the shards."""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import evalsets
from pipeline.backend import LOCAL, Backend
from pipeline.captions import TokenCounter
from pipeline.curate.decode import Decoder, Spill, prepare
from pipeline.curate.heldout import (
    coco_test_file,
    flickr_test_file,
    read_coco_heldout,
    read_flickr_heldout,
    replace_test,
    write_heldout,
)
from pipeline.curate.keys import key_stem, pair_order, rank
from pipeline.curate.paths import SourcePaths
from pipeline.curate.selection import Candidate, Selection, SourceStats, select_cc, select_listed
from pipeline.curate.settings import Settings
from pipeline.curate.tables import REJECTS_SCHEMA, TRAIN_SCHEMA, TRAIN_SOURCES, Ledger
from pipeline.curate.zeroshot_probe import write_cifar, write_imagenet, write_probe
from pipeline.files import atomic_dir
from pipeline.shards import ShardWriter
from pipeline.sources import (
    SourceError,
    index_images,
    read_captions,
    read_sugarcrepe,
)
from pipeline.tables import write_table

# --- the whole stage ----------------------------------------------------------------------------------


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
    cfg: Settings,
    paths: SourcePaths,
    out: Path | str,
    count_tokens: TokenCounter,
    workers: int = 2,
    progress: bool = True,
    backend: Backend = LOCAL,
) -> dict:
    """Run the whole curation into `out` (replaced atomically); returns the metrics. Images are
    decoded in `workers` processes, or on the Ray backend in Ray tasks; selection, the hash sets
    of the leakage guard and de-duplication, and writing stay in this process, so they are exact.

    Raises SourceError for a malformed raw file (naming the file and key); bad images and
    captions are refused and recorded, never raised."""
    with atomic_dir(out) as tmp:
        spill = Spill(tmp / ".spill")
        try:
            place = replace(backend, threads=workers)
            return _curate(cfg, paths, tmp, spill, count_tokens, place, progress)
        finally:
            spill.close()  # the spill file is scratch: gone before the folder is renamed into place


def _curate(
    cfg: Settings,
    paths: SourcePaths,
    tmp: Path,
    spill: Spill,
    count_tokens: TokenCounter,
    backend: Backend,
    progress: bool,
) -> dict:
    ledger = Ledger()
    mix = cfg.mix
    sel = Selection(
        seed=cfg.seed,
        captions_per_image=cfg.captions_per_image,
        count_tokens=count_tokens,
        max_tokens=cfg.max_tokens,
        ledger=ledger,
        spill=spill,
        stats={s: SourceStats(asked=mix[s]) for s in TRAIN_SOURCES},
    )
    prep = partial(prepare, size=cfg.image_size, quality=cfg.jpeg_quality)
    # Raw annotations first: a malformed file fails the run before any decoding. A source the
    # params switch off has no paths here (None) and is not read.
    coco_index = index_images(paths.coco_images) if paths.coco_images is not None else {}
    coco_heldout_ids: set[int] = set()
    coco_heldout: list = []
    if paths.coco_karpathy is not None:
        coco_heldout_ids, coco_heldout = read_coco_heldout(paths.coco_karpathy, coco_index)
    flickr_all: list = []
    flickr_heldout: list = []
    if paths.flickr30k_karpathy is not None and paths.flickr30k_images is not None:
        flickr_all, flickr_heldout = read_flickr_heldout(paths.flickr30k_karpathy, paths.flickr30k_images)
    if paths.coco_test is not None:
        coco_heldout = replace_test(coco_heldout, coco_test_file(paths.coco_test, coco_index))
        coco_heldout_ids |= {int(h.id) for h in coco_heldout}
    if paths.flickr30k_test is not None and paths.flickr30k_images is not None:
        flickr_heldout = replace_test(
            flickr_heldout, flickr_test_file(paths.flickr30k_test, paths.flickr30k_images)
        )
    flickr_out = {h.id: h.split for h in flickr_heldout}
    coco_train = read_captions(paths.coco_train_annotations) if paths.coco_train_annotations else {}
    probe_items = read_sugarcrepe(paths.sugarcrepe_annotations) if paths.sugarcrepe_annotations else None
    built: dict[str, list[str]] = {}  # eval/sets.json: the evaluation sets written, and their splits
    val: dict[str, dict] = {}
    test: dict[str, dict] = {}
    probe: dict[str, dict] = {}
    with Decoder(backend) as decoder:
        retrieval = (
            ("coco", coco_heldout, paths.coco_karpathy, paths.coco_test),
            ("flickr30k", flickr_heldout, paths.flickr30k_karpathy, paths.flickr30k_test),
        )
        for name, items, karpathy_file, test_file in retrieval:
            if karpathy_file is None:  # switched off
                continue
            splits = write_heldout(name, items, tmp, decoder, cfg, sel, progress)
            val[name], test[name] = splits["val"], splits["test"]
            # Which file each set came from: Karpathy's JSON or CLIP_benchmark's (test only).
            val[name]["annotations"] = karpathy_file.name
            test[name]["annotations"] = (test_file or karpathy_file).name
            built[name] = ["val", "test"]
        if probe_items is not None and paths.sugarcrepe_images is not None:
            probe["sugarcrepe"] = write_probe(
                probe_items, paths.sugarcrepe_images, tmp, decoder, cfg, sel, progress
            )
            built["sugarcrepe"] = ["test"]
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
        select_listed(sel, decoder, prep, [(c, p) for _, c, p in ranked], progress)
        # Flickr30k: every Karpathy image; val and test out by file name.
        ranked = []
        for im in flickr_all:
            if im.split in ("val", "test") or im.filename in flickr_out:
                split = im.split if im.split in ("val", "test") else flickr_out[im.filename]
                ledger.refuse("flickr30k", im.filename, "heldout_filename", f"Karpathy {split} image")
                continue
            assert paths.flickr30k_images is not None  # flickr_all is read from it
            cand = Candidate("flickr30k", im.filename, key_stem(im.filename), im.captions)
            ranked.append(
                (rank(cfg.seed, "flickr30k", im.filename), cand, paths.flickr30k_images / im.filename)
            )
        sel.stats["flickr30k"].candidates = len(flickr_all)
        ranked.sort(key=lambda t: t[0])
        select_listed(sel, decoder, prep, [(c, p) for _, c, p in ranked], progress)
        # Conceptual Captions: streamed.
        if paths.cc_shards is not None:
            select_cc(sel, decoder, prep, paths.cc_shards, progress)
        _check_empty_sources(sel, paths, cfg.allow_empty_source)
        train_shards = _write_train(sel, tmp, cfg.shard_size, progress)
        zeroshot = {}
        if paths.imagenet_val is not None:
            zeroshot["imagenet"] = write_imagenet(paths.imagenet_val, decoder, cfg, tmp, ledger, progress)
    for name, folder in (("cifar10", paths.cifar10), ("cifar100", paths.cifar100)):
        if folder is not None:
            zeroshot[name] = write_cifar(name, folder, cfg, tmp, ledger, progress)
    built.update({name: ["test"] for name in zeroshot})
    evalsets.write_built(tmp, built)
    write_table(tmp / "rejects.parquet", ledger.table(), REJECTS_SCHEMA)
    return {**_metrics(sel, ledger, val, test, zeroshot, train_shards), "probe": probe}


def _check_empty_sources(sel: Selection, paths: SourcePaths, allow: bool) -> None:
    """A source the mix asks for that gave no pair at all is an error (or, allowed, a warning):
    an empty or unreadable download must not pass as a smaller mix."""
    folders = {"coco": paths.coco_images, "flickr30k": paths.flickr30k_images, "cc": paths.cc_shards}
    for source in TRAIN_SOURCES:
        st = sel.stats[source]
        if st.asked == 0 or st.pairs > 0:
            continue
        message = (
            f"{folders[source]}: curate.mix.{source} asks for {st.asked} pairs but the source gave none "
            f"({st.candidates} candidate(s), all refused or absent: see rejects.parquet)"
        )
        if not allow:
            raise SourceError(
                message + "; set curate.mix." + source + ": 0, or curate.allow_empty_source: true"
            )
        print(f"warning: {message}; going on without it (curate.allow_empty_source)", file=sys.stderr)


def _metrics(
    sel: Selection, ledger: Ledger, val: dict, test: dict, zeroshot: dict, train_shards: int
) -> dict:
    train: dict[str, Any] = {}
    for source in TRAIN_SOURCES:
        st = sel.stats[source]
        if st.asked == 0:  # switched off: not reported
            continue
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

"""Curation: raw COCO / Flickr30k / Conceptual Captions into training shards, with the Karpathy
val and test images kept out; the Karpathy val and test sets and the zero-shot sets as evaluation
shards.

Output folder (written under a temporary name and renamed when complete):

    train/00000.tar …      WebDataset: <key>.jpg, <key>.txt (caption), <key>.json (metadata)
    train.parquet          one row per training pair: key, shard, source, id, caption, …
    eval/                  the evaluation sets, in CLIP_benchmark's WebDataset layout
                           (pipeline/evalsets.py); eval/sets.json lists those built:
      coco/val/0.tar …, coco/val.parquet        Karpathy val: every caption of every image;
      flickr30k/val/…, flickr30k/val.parquet    where every choice is made (never on test)
      coco/test/…, coco/test.parquet            Karpathy test: the same layout; the readout
      flickr30k/test/…, flickr30k/test.parquet
      {imagenet,cifar10,cifar100}/test/…, <name>/test.parquet, <name>/classnames.txt
      sugarcrepe/test/…, sugarcrepe/test.parquet   the probe's images and items
    rejects.parquet        everything refused or excluded: source, id, reason, detail

A source the params switch off (null; for a training-only input, a mix of 0) is not read, and
nothing is built from it.

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

Modules, by job: settings (what decides the outputs), paths (where the raw data is), keys (ranks,
keys and caption draws), decode (worker processes and the spill file), selection (the training
selection), heldout (the Karpathy val and test sets and the hashes that guard them), zeroshot_probe (the
probe and the zero-shot sets), tables (output schemas and the rejects ledger), run (the whole stage).
"""

from __future__ import annotations

from pipeline.curate.decode import CHUNK, Decoder, prepare
from pipeline.curate.keys import key_stem, pick_caption, rank
from pipeline.curate.paths import SourcePaths
from pipeline.curate.run import curate
from pipeline.curate.settings import Settings
from pipeline.curate.tables import EXCLUDED_REASONS, TEST_SCHEMA, TRAIN_SCHEMA, TRAIN_SOURCES, ZEROSHOT_SETS

__all__ = [
    "CHUNK",
    "EXCLUDED_REASONS",
    "TEST_SCHEMA",
    "TRAIN_SCHEMA",
    "TRAIN_SOURCES",
    "ZEROSHOT_SETS",
    "Decoder",
    "Settings",
    "SourcePaths",
    "curate",
    "key_stem",
    "pick_caption",
    "prepare",
    "rank",
]

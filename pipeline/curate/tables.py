"""curate's output tables: their schemas and the ledger of refusals (rejects.parquet)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa

TRAIN_SOURCES = ("coco", "flickr30k", "cc")
ZEROSHOT_SETS = ("imagenet", "cifar10", "cifar100")

# Reasons that keep a usable image out on purpose; every other reason is a refusal of bad input.
EXCLUDED_REASONS = frozenset({"heldout_id", "heldout_filename", "heldout_hash", "duplicate"})


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

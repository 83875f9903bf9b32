"""embed's output tables: their schemas, and the settings that decide their rows."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipeline import regions
from pipeline.errors import InputError
from pipeline.regions import Combination

TABLES = ("images", "regions", "captions", "rejects")
# Columns of detect's regions table that embed reads.
DETECT_COLUMNS = ("key", "width", "height", "boxes", "confidences", "classes", "class_names", "reject")
MANIFEST_COLUMNS = ("key", "shard", "image")


class EmbedError(InputError, RuntimeError):
    """Inputs that do not fit together (a stale regions table, a missing manifest row, ...) or a
    model that cannot be used as asked; the message says which and what to do."""


@dataclass(frozen=True)
class Settings:
    """What, besides the model and the inputs, decides the outputs (the `embed` params)."""

    context_margin: float  # per side, a fraction of the box's width (height)
    weights: Combination
    max_regions: int | None  # per image, the whole image included; None: every box
    batch_size: int  # crops (captions) per forward; float results may differ in the last bits

    def __post_init__(self) -> None:
        if self.max_regions is not None and self.max_regions < 1:
            raise ValueError("max_regions counts the whole image: it must be at least 1")
        if self.weights not in regions.COMBINATIONS:
            raise ValueError(f"weights {self.weights!r}: expected one of {regions.COMBINATIONS}")


def _vec(dim: int, dtype: pa.DataType | None = None) -> pa.DataType:
    return pa.list_(dtype or pa.float16(), dim)


def _str(name: str) -> pa.Field:
    return pa.field(name, pa.string(), nullable=False)


def _int(name: str) -> pa.Field:
    return pa.field(name, pa.int32(), nullable=False)


def schemas(dim: int) -> dict[str, pa.Schema]:
    """The output tables for a model with a `dim`-dimensional joint space."""
    vec = pa.field("embedding", _vec(dim), nullable=False)
    floats = pa.list_(pa.float32())
    return {
        "images": pa.schema(
            [_str("image"), _str("key"), _str("shard"), _int("width"), _int("height"), _int("regions"), vec]
        ),
        "regions": pa.schema(
            [
                _str("image"),
                _int("region"),
                pa.field("box", _vec(4, pa.float32()), nullable=False),
                pa.field("crop", _vec(4, pa.int32()), nullable=False),
                pa.field("confidence", pa.float32(), nullable=False),
                pa.field("area", pa.float32(), nullable=False),
                _int("class"),
                _str("class_name"),
                vec,
            ]
        ),
        "captions": pa.schema(
            [
                _str("key"),
                _str("image"),
                _str("shard"),
                _str("caption"),
                vec,
                pa.field("tokens", pa.list_(_vec(dim)), nullable=False),
                _int("length"),
                pa.field("similarities", floats, nullable=False),
                pa.field("weights", floats, nullable=False),
            ]
        ),
        "rejects": pa.schema([_str("key"), _str("image"), _str("shard"), _str("reason"), _str("detail")]),
    }

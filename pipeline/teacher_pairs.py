"""The teacher's view of the embed cache: one `Pair` per (image, caption), read from embed's
teacher-ready shards, a held-out slice of images for validation, and seeded batches.

Every embedding is L2-normalised on reading (`unit`), so attention and pooling see CLIP's cosine
geometry. Streaming: an epoch visits the shards in a seeded order, each shard's pairs in a seeded
order, so memory holds a shard and the order depends on (seed, epoch) alone.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import InputError
from pipeline.models.teacher import PairBatch, pad
from pipeline.shards import read_shard

FIELDS = ("regions", "weights", "prior", "tokens", "caption", "image")


@dataclass(frozen=True)
class Pair:
    key: str
    image_id: str  # the image's key: the pairs of one image share it
    regions: np.ndarray  # [R, D]
    weights: np.ndarray  # [R]
    prior: np.ndarray  # [R]: the weights without their caption factor
    tokens: np.ndarray  # [T, D]
    caption: np.ndarray  # [D]
    image: np.ndarray  # [D]: the base CLIP image embedding, for reference only


# Teacher shards up to this many bytes in all are read once and kept in memory (as they are on
# disk: float16 arrays) for every later epoch: on the demo, reading the tar members took 60 % of
# an epoch. Larger caches stream from disk every epoch, in bounded memory.
MEMORY_CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class Data:
    shards: tuple[Path, ...]
    batch_size: int
    val_fraction: float
    seed: int
    memory_cache_bytes: int = MEMORY_CACHE_BYTES
    prior: bool = False  # region weights without the caption factor (a teacher that reads no caption)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def pairs(self, shard: Path) -> list[Pair] | Iterator[Pair]:
        """A shard's pairs: from memory once read, when all the shards fit the budget."""
        if shard in self._cache:
            return self._cache[shard]
        if sum(s.stat().st_size for s in self.shards) > self.memory_cache_bytes:
            return read_pairs(shard)
        self._cache[shard] = list(read_pairs(shard))
        return self._cache[shard]


def _array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_pairs(shard: Path) -> Iterator[Pair]:
    for key, sample in read_shard(shard):
        missing = [f"{f}.npy" for f in FIELDS if f"{f}.npy" not in sample] + ["json"] * ("json" not in sample)
        if missing:
            raise InputError(
                f"{shard}: sample {key}: missing {', '.join(missing)} (an older embed cache: run embed again)"
            )
        yield Pair(key, _image_id(shard, key, sample), *(_array(sample[f"{f}.npy"]) for f in FIELDS))


def _image_id(shard: Path, key: str, sample: dict[str, bytes]) -> str:
    """The image a teacher sample belongs to, from its json member."""
    image_id = json.loads(sample["json"]).get("image") if "json" in sample else None
    if not isinstance(image_id, str):
        raise InputError(f"{shard}: sample {key}: json has no image key")
    return image_id


def is_validation(image_id: str, fraction: float, seed: int) -> bool:
    """A fixed pseudo-random slice of the images, by image key: the same whatever the shards, and
    every pair of an image on the same side."""
    digest = hashlib.sha256(f"{seed}|{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def unit(a: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(a.astype(np.float32)), dim=-1)


def collate(pairs: list[Pair], prior: bool = False) -> PairBatch:
    """A padded batch; `prior`: the caption-free region weights in place of the pair's own."""
    regions, rmask = pad([unit(p.regions) for p in pairs])
    weights, _ = pad([torch.from_numpy((p.prior if prior else p.weights).astype(np.float32)) for p in pairs])
    tokens, tmask = pad([unit(p.tokens) for p in pairs])
    caption = torch.stack([unit(p.caption) for p in pairs])
    return PairBatch(regions, rmask, weights, tokens, tmask, caption)


def epoch_pairs(data: Data, epoch: int) -> Iterator[list[Pair]]:
    """The training pairs of one epoch in batches, in an order fixed by (seed, epoch); a last
    batch of fewer than two pairs is dropped (InfoNCE needs a negative)."""
    rng = np.random.default_rng([data.seed, epoch])
    batch: list[Pair] = []
    for s in rng.permutation(len(data.shards)):
        pairs = [
            p
            for p in data.pairs(data.shards[s])
            if not is_validation(p.image_id, data.val_fraction, data.seed)
        ]
        for i in rng.permutation(len(pairs)):
            batch.append(pairs[i])
            if len(batch) == data.batch_size:
                yield batch
                batch = []
    if len(batch) >= 2:
        yield batch


def validation_pairs(data: Data) -> list[Pair]:
    return [
        p
        for s in data.shards
        for p in data.pairs(s)
        if is_validation(p.image_id, data.val_fraction, data.seed)
    ]


def count_training_pairs(data: Data) -> int:
    """Training pairs, from each sample's json alone (no array is decoded)."""
    return sum(
        1
        for s in data.shards
        for key, sample in read_shard(s)
        if not is_validation(_image_id(s, key, sample), data.val_fraction, data.seed)
    )


# --- validation -------------------------------------------------------------------------------

"""What decides curate's outputs (the `curate` params), as the library takes it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    seed: int
    mix: dict[str, int]  # training pairs asked of each source: coco, flickr30k, cc
    allow_empty_source: bool  # a source asked for that yields no pair: a warning, not an error
    captions_per_image: int | str  # 1 (drawn from seed and id) or "all"
    max_tokens: int  # the longest caption kept, in the CLIP tokenizer's tokens
    image_size: int  # short side of stored images
    jpeg_quality: int
    shard_size: int  # samples per WebDataset shard

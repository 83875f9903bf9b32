"""Ranks, keys and caption draws: every choice curate makes is a hash of (seed, source, id)."""

from __future__ import annotations

import hashlib
import re

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


def pair_order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:order:{key}".encode()).hexdigest()

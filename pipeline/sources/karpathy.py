"""Karpathy's split files, dataset_coco.json and dataset_flickr30k.json (also dataset_flickr8k.json).

Only what the pipeline uses is read and checked: imgid, sentids and each sentence's tokens are
Karpathy's own bookkeeping and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.sources._json import JsonFile

SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True, slots=True)
class KarpathyImage:
    dataset: str  # the file's top-level "dataset": "coco", "flickr30k", ...
    split: str  # one of SPLITS; "restval" is COCO val2014 outside Karpathy's val and test
    filename: str  # e.g. "COCO_val2014_000000391895.jpg" or "1000092795.jpg"
    filepath: str | None  # COCO only: "val2014" or "train2014"
    cocoid: int | None  # COCO only
    captions: tuple[str, ...]  # sentences[*].raw, in order


def read_karpathy(path: Path | str) -> list[KarpathyImage]:
    doc = JsonFile(path)
    root = doc.check(doc.root, dict, "")
    dataset = doc.get(root, "", "dataset", str)
    images = []
    for i, im in enumerate(doc.items(root, "", "images", dict)):
        loc = f"images[{i}]"
        split = doc.get(im, loc, "split", str)
        if split not in SPLITS:
            raise doc.error(f"{loc}.split", f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        sentences = doc.items(im, loc, "sentences", dict)
        captions = tuple(doc.get(s, f"{loc}.sentences[{j}]", "raw", str) for j, s in enumerate(sentences))
        images.append(
            KarpathyImage(
                dataset=dataset,
                split=split,
                filename=doc.get(im, loc, "filename", str),
                filepath=doc.get(im, loc, "filepath", str, optional=True),
                cocoid=doc.get(im, loc, "cocoid", int, optional=True),
                captions=captions,
            )
        )
    return images

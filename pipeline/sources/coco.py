"""COCO captions: the annotation JSON (2014 or 2017 schema) and the image folders."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.sources._json import JsonFile


@dataclass(frozen=True, slots=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    captions: tuple[str, ...]  # in annotation order, text as given (COCO's often ends in a space)


def read_captions(path: Path | str) -> dict[int, CocoImage]:
    """COCO id → image, in the order of the file's `images`; an image without captions is kept."""
    return parse_captions(JsonFile(path))


def parse_captions(doc: JsonFile) -> dict[int, CocoImage]:
    root = doc.check(doc.root, dict, "")
    fields: dict[int, tuple[str, int, int]] = {}
    for i, im in enumerate(doc.items(root, "", "images", dict)):
        loc = f"images[{i}]"
        image_id = doc.get(im, loc, "id", int)
        if image_id in fields:
            raise doc.error(f"{loc}.id", f"duplicate image id {image_id}")
        fields[image_id] = (
            doc.get(im, loc, "file_name", str),
            doc.get(im, loc, "width", int),
            doc.get(im, loc, "height", int),
        )
    captions: dict[int, list[str]] = {image_id: [] for image_id in fields}
    for i, ann in enumerate(doc.items(root, "", "annotations", dict)):
        loc = f"annotations[{i}]"
        image_id = doc.get(ann, loc, "image_id", int)
        doc.get(ann, loc, "id", int)
        caption = doc.get(ann, loc, "caption", str)
        if image_id not in captions:
            raise doc.error(f"{loc}.image_id", f"image {image_id} is not among images")
        captions[image_id].append(caption)
    return {
        image_id: CocoImage(image_id, name, width, height, tuple(captions[image_id]))
        for image_id, (name, width, height) in fields.items()
    }


# Preference order: the same picture may be on disk in both layouts; 2017 wins, deterministically.
IMAGE_FOLDERS = ("train2017", "val2017", "train2014", "val2014")


# 2017: 000000391895.jpg; 2014: COCO_val2014_000000391895.jpg. Both name the COCO id.
_IMAGE_NAME = re.compile(r"(?:COCO_[a-z]+2014_)?(\d+)\.jpg")


def index_images(root: Path | str) -> dict[int, Path]:
    """COCO id → image file, over whichever of IMAGE_FOLDERS exist under `root`.

    Files whose names are not COCO image names (e.g. .DS_Store) are ignored."""
    root = Path(root)
    index: dict[int, Path] = {}
    for folder in IMAGE_FOLDERS:
        if not (root / folder).is_dir():
            continue
        with os.scandir(root / folder) as entries:
            found = {}
            for entry in entries:
                match = _IMAGE_NAME.fullmatch(entry.name)
                if match and entry.is_file():
                    found[int(match.group(1))] = Path(entry.path)
        for image_id in sorted(found):
            index.setdefault(image_id, found[image_id])
    return index

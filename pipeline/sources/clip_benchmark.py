"""The Karpathy test sets as LAION's CLIP_benchmark ships them (mehdidc/retrieval_annotations,
release 1.0.0): an alternative to dataset_coco.json / dataset_flickr30k.json for evaluation.

- coco_test_karpathy.json: COCO's own captions_val2014.json cut down to Karpathy's 5,000 test
  images (same schema: images[*].file_name "COCO_val2014_000000391895.jpg", no folder, as
  CLIP_benchmark opens it with torchvision's CocoCaptions rooted at val2014/). Images come back
  in CocoCaptions' order, sorted by COCO id. The BLIP/LAVIS coco_karpathy_test.json (a list of
  {"image": "val2014/COCO_val2014_….jpg", "caption": [...]}) is read too, in file order.
- flickr30k_test_karpathy.txt: a CSV written by pandas, header "image,caption", one line per
  caption ("1007129816.jpg,The man with ..."); a caption with a comma or quote is CSV-quoted.
  Images come back in order of first appearance, captions in line order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pipeline.sources._json import JsonFile
from pipeline.sources.coco import parse_captions
from pipeline.sources.errors import SourceError


@dataclass(frozen=True, slots=True)
class TestImage:
    __test__ = False  # not a pytest test class, whatever its name

    filename: str  # as the file gives it, relative to the image folder the benchmark expects
    captions: tuple[str, ...]


def read_coco_test_karpathy(path: Path | str) -> list[TestImage]:
    doc = JsonFile(path)
    if isinstance(doc.root, list):
        return _read_blip_list(doc)
    images = parse_captions(doc)
    return [TestImage(images[i].file_name, images[i].captions) for i in sorted(images)]


def _read_blip_list(doc: JsonFile) -> list[TestImage]:
    out = []
    for i, item in enumerate(doc.root):
        loc = f"[{i}]"
        doc.check(item, dict, loc)
        captions = tuple(doc.items(item, loc, "caption", str))
        out.append(TestImage(doc.get(item, loc, "image", str), captions))
    return out


HEADER = ["image", "caption"]


def read_flickr30k_test_karpathy(path: Path | str) -> list[TestImage]:
    captions: dict[str, list[str]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f, strict=True)
            header = next(rows, None)
            if header != HEADER:
                raise SourceError(f"{path}: line 1: expected the header 'image,caption', got {header!r}")
            for row in rows:
                if not row:  # a blank line
                    continue
                if len(row) != 2:
                    raise SourceError(
                        f"{path}: line {rows.line_num}: expected 2 fields (image, caption), got {len(row)}"
                    )
                image, caption = row
                if not image:
                    raise SourceError(f"{path}: line {rows.line_num}: image: empty")
                captions.setdefault(image, []).append(caption)
    except (csv.Error, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: line {rows.line_num}: not valid CSV: {err}") from None
    return [TestImage(image, tuple(texts)) for image, texts in captions.items()]

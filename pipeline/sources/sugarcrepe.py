"""SugarCrepe's compositional hard negatives (RAIVNLab/sugar-crepe, data/<category>.json): each
file maps an index to {"filename": <COCO val2017 file name>, "caption", "negative_caption"}.
The demo world writes the same format for its own probe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.sources._json import JsonFile
from pipeline.sources.errors import SourceError

CATEGORIES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


@dataclass(frozen=True, slots=True)
class ProbeItem:
    category: str
    index: str  # the item's key in its file
    filename: str
    caption: str
    negative_caption: str


def read_category(path: Path | str, category: str) -> list[ProbeItem]:
    doc = JsonFile(path)
    root = doc.check(doc.root, dict, "")
    items = []
    for index, item in root.items():
        doc.check(item, dict, index)
        fields = [doc.get(item, index, k, str) for k in ("filename", "caption", "negative_caption")]
        for key, value in zip(("filename", "caption", "negative_caption"), fields):
            if not value.strip():
                raise doc.error(f"{index}.{key}", "empty")
        items.append(ProbeItem(category, index, *fields))
    return items


def read_sugarcrepe(folder: Path | str) -> list[ProbeItem]:
    """Every item of the seven categories, category by category in file order. A missing
    category file is an error: a partial probe would make the mean incomparable."""
    folder = Path(folder)
    missing = [c for c in CATEGORIES if not (folder / f"{c}.json").is_file()]
    if missing:
        raise SourceError(f"{folder}: missing SugarCrepe file(s): {', '.join(f'{c}.json' for c in missing)}")
    return [item for c in CATEGORIES for item in read_category(folder / f"{c}.json", c)]

"""The ImageNet validation set in class folders: root/<wnid>/*.JPEG, as torchvision's ImageFolder
and CLIP_benchmark read it, with class names from open_clip (ImageNet-1k) or LOC_synset_mapping.txt."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.sources.errors import SourceError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MAPPING_FILE = "LOC_synset_mapping.txt"  # from Kaggle's ILSVRC download, beside val/


def read_synset_mapping(path: Path | str) -> dict[str, str]:
    """Lines "n01440764 tench, Tinca tinca" → {"n01440764": "tench"}: the first name of each."""
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            wnid, _, rest = line.strip().partition(" ")
            name = rest.split(",")[0].strip()
            if not name:
                raise SourceError(f"{path}: line {n}: expected 'wnid name[, synonyms]', got {line.strip()!r}")
            if wnid in names:
                raise SourceError(f"{path}: line {n}: wnid {wnid!r} appears twice")
            names[wnid] = name
    return names


def _open_clip_names(wnids: list[str]) -> list[str] | None:
    """open_clip's curated ImageNet-1k names, when the folders are exactly ImageNet-1k's classes."""
    # timm (an open_clip dependency) knows the 1000 wnids; open_clip's names follow their sorted order.
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    if wnids != sorted(ImageNetInfo("imagenet-1k").label_names()):
        return None
    return list(IMAGENET_CLASSNAMES)


def read_imagenet_val(
    root: Path | str, classnames_file: Path | str | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]): classes are the sorted wnid folders, label their index;
    samples in class order, then file name order."""
    root = Path(root)
    with os.scandir(root) as entries:
        wnids = sorted(e.name for e in entries if e.is_dir())
    if not wnids:
        raise SourceError(f"{root}: no class folders")
    # An explicit file wins. Otherwise real ImageNet-1k gets open_clip's curated names (those
    # zero-shot numbers are reported with; the mapping file's first names repeat "crane" and
    # "maillot"), and any other class set needs the mapping file beside val/.
    found = _open_clip_names(wnids) if classnames_file is None else None
    if found is None and classnames_file is None and (root.parent / MAPPING_FILE).is_file():
        classnames_file = root.parent / MAPPING_FILE
    if found is not None:
        classnames = found
    elif classnames_file is not None:
        mapping = read_synset_mapping(classnames_file)
        missing = [w for w in wnids if w not in mapping]
        if missing:
            raise SourceError(
                f"{classnames_file}: no name for class folder {missing[0]!r} ({len(missing)} missing)"
            )
        classnames = [mapping[w] for w in wnids]
    else:
        raise SourceError(
            f"{root}: {len(wnids)} class folders that are not ImageNet-1k's 1000 and no {MAPPING_FILE} "
            "beside them: pass the class names file"
        )
    samples: list[tuple[Path, int]] = []
    for label, wnid in enumerate(wnids):
        with os.scandir(root / wnid) as entries:
            files = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        samples.extend((root / wnid / name, label) for name in files)
    return classnames, samples

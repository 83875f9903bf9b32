"""The ImageNet validation folder reader (pipeline/sources/imagenet.py): class names from a mapping
or from open_clip, malformed mappings, and the demo world's folder read back."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from timm.data import ImageNetInfo

from pipeline.sources import SourceError, read_imagenet_val

from .helpers import FIXTURES, TINY_WORLD, touch

# --- ImageNet validation folder --------------------------------------------------------------


def imagenet_tree(tmp_path: Path) -> tuple[Path, list[tuple[Path, int]]]:
    val = tmp_path / "imagenet" / "val"
    samples = [
        (touch(val / "n01440764" / "ILSVRC2012_val_00000293.JPEG"), 0),
        (touch(val / "n01440764" / "ILSVRC2012_val_00002138.JPEG"), 0),
        (touch(val / "n01443537" / "a.jpg"), 1),
        (touch(val / "n01443537" / "b.png"), 1),
        (touch(val / "n01443537" / "c.jpeg"), 1),
    ]
    touch(val / "n01443537" / "notes.txt")
    (val / "n04579432").mkdir()  # a class without images is still a class
    touch(val / "README")  # a file beside the class folders is not a class
    return val, samples


def test_read_imagenet_val_with_mapping_beside_it(tmp_path):
    val, samples = imagenet_tree(tmp_path)
    shutil.copy(FIXTURES / "LOC_synset_mapping.txt", val.parent)
    assert read_imagenet_val(val) == (["tench", "goldfish", "whistle"], samples)


def test_read_imagenet_val_with_a_names_file(tmp_path):
    val, samples = imagenet_tree(tmp_path)
    classnames, got = read_imagenet_val(str(val), classnames_file=FIXTURES / "LOC_synset_mapping.txt")
    assert (classnames, got) == (["tench", "goldfish", "whistle"], samples)
    # The first name, as given: ImageNet has two "crane"s (the bird and the machine).
    (val / "n02012849").mkdir()
    (val / "n03126707").mkdir()
    classnames, _ = read_imagenet_val(val, classnames_file=FIXTURES / "LOC_synset_mapping.txt")
    assert classnames == ["tench", "goldfish", "crane", "crane", "whistle"]


def test_read_imagenet_val_folder_without_a_name(tmp_path):
    val, _ = imagenet_tree(tmp_path)
    mapping = shutil.copy(FIXTURES / "LOC_synset_mapping.txt", val.parent)
    (val / "n09999999").mkdir()
    with pytest.raises(SourceError) as err:
        read_imagenet_val(val)
    assert str(err.value) == f"{mapping}: no name for class folder 'n09999999' (1 missing)"


def test_read_imagenet_val_malformed_mapping(tmp_path):
    val, _ = imagenet_tree(tmp_path)
    mapping = val.parent / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\nn01443537\n")
    with pytest.raises(SourceError) as err:
        read_imagenet_val(val)
    assert str(err.value) == f"{mapping}: line 2: expected 'wnid name[, synonyms]', got 'n01443537'"
    mapping.write_text("n01440764 tench\nn01440764 tinca\n")
    with pytest.raises(SourceError, match="line 2: wnid 'n01440764' appears twice"):
        read_imagenet_val(val)


def test_read_imagenet_val_unknown_classes_need_names(tmp_path):
    val, _ = imagenet_tree(tmp_path)
    with pytest.raises(SourceError) as err:
        read_imagenet_val(val)
    assert str(err.value) == (
        f"{val}: 3 class folders that are not ImageNet-1k's 1000 and no LOC_synset_mapping.txt beside "
        "them: pass the class names file"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no class folders"):
        read_imagenet_val(empty)


def test_read_imagenet_val_1k_takes_open_clip_names(tmp_path):
    val = tmp_path / "val"
    wnids = ImageNetInfo("imagenet-1k").label_names()
    for wnid in wnids:
        (val / wnid).mkdir(parents=True)
    touch(val / "n15075141" / "ILSVRC2012_val_00000001.JPEG")
    classnames, samples = read_imagenet_val(val)
    assert classnames == list(IMAGENET_CLASSNAMES)
    assert classnames[0] == "tench" and classnames[999] == "toilet paper"
    assert samples == [(val / "n15075141" / "ILSVRC2012_val_00000001.JPEG", 999)]
    os.rmdir(val / wnids[500])
    with pytest.raises(SourceError, match="999 class folders that are not ImageNet-1k's 1000"):
        read_imagenet_val(val)


def test_read_imagenet_val_1k_prefers_open_clip_names_to_the_mapping_beside_it(tmp_path):
    # The mapping's first names repeat "crane"; zero-shot numbers are reported with open_clip's.
    val = tmp_path / "imagenet" / "val"
    wnids = ImageNetInfo("imagenet-1k").label_names()
    for wnid in wnids:
        (val / wnid).mkdir(parents=True)
    (tmp_path / "imagenet" / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} mapped{i}\n" for i, w in enumerate(sorted(wnids)))
    )
    assert read_imagenet_val(val)[0] == list(IMAGENET_CLASSNAMES)
    # An explicit names file still wins.
    explicit = read_imagenet_val(val, classnames_file=tmp_path / "imagenet" / "LOC_synset_mapping.txt")[0]
    assert explicit[:2] == ["mapped0", "mapped1"]


# --- the demo world, read back with the reader -----------------------------------------------


def test_demo_world_imagenet(tiny_world):
    per = TINY_WORLD["zeroshot"]["imagenet_per_class"]
    classnames, samples = read_imagenet_val(tiny_world / "imagenet" / "val")
    assert len(classnames) == 100 and classnames[0] == "red circle"
    assert len(samples) == 100 * per
    assert Counter(label for _, label in samples) == {k: per for k in range(100)}
    assert all(path.is_file() and path.suffix == ".JPEG" for path, _ in samples)

"""The checks every JSON annotation reader shares (pipeline/sources/_json.py): malformed files,
whose errors must name the file and the key, and the error they raise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.sources import SourceError, read_captions, read_coco_test_karpathy, read_karpathy

from .helpers import FIXTURES


def test_source_error_is_a_value_error():
    assert issubclass(SourceError, ValueError)


# --- malformed annotation files --------------------------------------------------------------


def mutated(tmp_path: Path, fixture: str, mutate: Callable[[Any], object]) -> Path:
    """The fixture with one change: `mutate` edits the parsed JSON in place (its result is ignored)."""
    root = json.loads((FIXTURES / fixture).read_text())
    mutate(root)
    path = tmp_path / fixture
    path.write_text(json.dumps(root))
    return path


def _del(key):
    def mutate(obj):
        del obj[key]

    return mutate


MALFORMED_JSON = [
    # (reader, fixture, mutation, the message after "<file>: ")
    (read_captions, "captions_val2014.json", lambda r: r.clear(), "images: missing"),
    (read_captions, "captions_val2014.json", _del("annotations"), "annotations: missing"),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r.update(annotations={}),
        "annotations: expected a list, got object",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["annotations"][3].pop("caption"),
        "annotations[3].caption: missing",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["annotations"][3].update(caption=5),
        "annotations[3].caption: expected a string, got int",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["annotations"][2].pop("id"),
        "annotations[2].id: missing",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["annotations"][0].update(image_id=7),
        "annotations[0].image_id: image 7 is not among images",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["images"][1].update(id="522418"),
        "images[1].id: expected an integer, got string",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["images"][0].update(width=True),
        "images[0].width: expected an integer, got bool",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["images"][2].update(height=375.0),
        "images[2].height: expected an integer, got float",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["images"][0].pop("file_name"),
        "images[0].file_name: missing",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["images"].__setitem__(2, []),
        "images[2]: expected an object, got list",
    ),
    (
        read_captions,
        "captions_val2014.json",
        lambda r: r["images"][2].update(id=391895),
        "images[2].id: duplicate image id 391895",
    ),
    (read_karpathy, "dataset_coco.json", _del("dataset"), "dataset: missing"),
    (read_karpathy, "dataset_coco.json", _del("images"), "images: missing"),
    (
        read_karpathy,
        "dataset_coco.json",
        lambda r: r["images"][2].update(split="testing"),
        "images[2].split: unknown split 'testing' (expected one of train, restval, val, test)",
    ),
    (
        read_karpathy,
        "dataset_coco.json",
        lambda r: r["images"][3].pop("split"),
        "images[3].split: missing",
    ),
    (
        read_karpathy,
        "dataset_coco.json",
        lambda r: r["images"][0]["sentences"][1].pop("raw"),
        "images[0].sentences[1].raw: missing",
    ),
    (
        read_karpathy,
        "dataset_coco.json",
        lambda r: r["images"][0]["sentences"][0].update(raw=["A", "man"]),
        "images[0].sentences[0].raw: expected a string, got list",
    ),
    (
        read_karpathy,
        "dataset_coco.json",
        lambda r: r["images"][0].update(cocoid="391895"),
        "images[0].cocoid: expected an integer, got string",
    ),
    (
        read_karpathy,
        "dataset_coco.json",
        lambda r: r["images"][0].update(filepath=None),
        "images[0].filepath: expected a string, got null",
    ),
    (
        read_karpathy,
        "dataset_flickr30k.json",
        lambda r: r["images"][1].pop("filename"),
        "images[1].filename: missing",
    ),
    (
        read_karpathy,
        "dataset_flickr30k.json",
        lambda r: r["images"][1].pop("sentences"),
        "images[1].sentences: missing",
    ),
    (
        read_coco_test_karpathy,
        "coco_test_karpathy.json",
        lambda r: r["annotations"][1].update(caption=None),
        "annotations[1].caption: expected a string, got null",
    ),
    (
        read_coco_test_karpathy,
        "coco_test_karpathy.json",
        lambda r: r["images"][0].pop("width"),
        "images[0].width: missing",
    ),
    (read_coco_test_karpathy, "coco_karpathy_test.json", lambda r: r[1].pop("image"), "[1].image: missing"),
    (
        read_coco_test_karpathy,
        "coco_karpathy_test.json",
        lambda r: r[1].update(caption="A young girl."),
        "[1].caption: expected a list, got string",
    ),
    (
        read_coco_test_karpathy,
        "coco_karpathy_test.json",
        lambda r: r[0]["caption"].__setitem__(1, 3),
        "[0].caption[1]: expected a string, got int",
    ),
    (
        read_coco_test_karpathy,
        "coco_karpathy_test.json",
        lambda r: r.__setitem__(0, "val2014/COCO_val2014_000000391895.jpg"),
        "[0]: expected an object, got string",
    ),
]


@pytest.mark.parametrize(
    ("reader", "fixture", "mutate", "message"),
    MALFORMED_JSON,
    ids=[f"{case[0].__name__}-{case[3]}" for case in MALFORMED_JSON],
)
def test_malformed_json_names_file_and_key(tmp_path, reader, fixture, mutate, message):
    path = mutated(tmp_path, fixture, mutate)
    with pytest.raises(SourceError) as err:
        reader(path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("reader", [read_captions, read_karpathy, read_coco_test_karpathy])
@pytest.mark.parametrize("text", ['{"images": [', "", "{'images': []}"])
def test_bad_json_names_the_file(tmp_path, reader, text):
    path = tmp_path / "annotations.json"
    path.write_text(text)
    with pytest.raises(SourceError, match=r"not valid JSON") as err:
        reader(path)
    assert str(err.value).startswith(f"{path}: not valid JSON: ")


@pytest.mark.parametrize("reader", [read_captions, read_karpathy])
def test_top_level_must_be_an_object(tmp_path, reader):
    path = tmp_path / "annotations.json"
    path.write_text('[{"images": []}]')
    with pytest.raises(SourceError) as err:
        reader(path)
    assert str(err.value) == f"{path}: (top level): expected an object, got list"


def test_missing_annotation_file_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "captions_val2014.json")

"""The readers of CLIP_benchmark's Karpathy test files (pipeline/sources/clip_benchmark.py): COCO's
JSON in both schemas, Flickr30k's CSV and its malformed variants, and the demo world written as
those files and read back."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.sources import (
    SourceError,
    TestImage,
    read_coco_test_karpathy,
    read_flickr30k_test_karpathy,
    read_karpathy,
)

from .helpers import FIXTURES, MAN_ON_MOPED, TINY_WORLD

# --- CLIP_benchmark's Karpathy test files ----------------------------------------------------


def test_read_coco_test_karpathy_coco_schema_sorted_by_id():
    # CLIP_benchmark opens it with torchvision's CocoCaptions: images sorted by id.
    assert read_coco_test_karpathy(FIXTURES / "coco_test_karpathy.json") == [
        TestImage(
            "COCO_val2014_000000060623.jpg",
            (
                "A young girl inhales with the intent of blowing out a candle. ",
                "A young girl is preparing to blow out her candle.",
            ),
        ),
        TestImage("COCO_val2014_000000391895.jpg", MAN_ON_MOPED),
    ]


def test_read_coco_test_karpathy_blip_list():
    assert read_coco_test_karpathy(FIXTURES / "coco_karpathy_test.json") == [
        TestImage("val2014/COCO_val2014_000000391895.jpg", MAN_ON_MOPED),
        TestImage(
            "val2014/COCO_val2014_000000060623.jpg",
            ("A young girl inhales with the intent of blowing out a candle. ",),
        ),
    ]


def test_read_flickr30k_test_karpathy_csv():
    assert read_flickr30k_test_karpathy(FIXTURES / "flickr30k_test_karpathy.txt") == [
        TestImage(
            "1007129816.jpg",
            (
                "The man with pierced ears is wearing glasses and an orange hat.",
                "A man with glasses is wearing a beer can crocheted hat, and a tie.",
                'A man wearing a hat that says "beer" smiles.',
            ),
        ),
        TestImage(
            "1009434119.jpg",
            ("A black and white dog is running in a grassy garden surrounded by a white fence.",),
        ),
    ]


# --- malformed files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1: expected the header 'image,caption', got None"),
        (
            "filename,text\na.jpg,A dog.\n",
            "line 1: expected the header 'image,caption', got ['filename', 'text']",
        ),
        (
            'image,caption\na.jpg,A dog.\na.jpg,A dog,"sitting"\n',
            "line 3: expected 2 fields (image, caption), got 3",
        ),
        ("image,caption\na.jpg\n", "line 2: expected 2 fields (image, caption), got 1"),
        ("image,caption\n,A dog.\n", "line 2: image: empty"),
        ('image,caption\na.jpg,"A dog\n', "line 2: not valid CSV: unexpected end of data"),
        ('image,caption\na.jpg,"A "dog"."\n', "line 2: not valid CSV: ',' expected after '\"'"),
    ],
)
def test_malformed_flickr30k_test_karpathy(tmp_path, text, message):
    path = tmp_path / "flickr30k_test_karpathy.txt"
    path.write_text(text)
    with pytest.raises(SourceError) as err:
        read_flickr30k_test_karpathy(path)
    assert str(err.value) == f"{path}: {message}"


def test_flickr30k_test_karpathy_skips_blank_lines(tmp_path):
    path = tmp_path / "flickr30k_test_karpathy.txt"
    path.write_text("image,caption\n\na.jpg,A dog.\n\n")
    assert read_flickr30k_test_karpathy(path) == [TestImage("a.jpg", ("A dog.",))]


# --- the demo world, read back with the reader -----------------------------------------------


def test_demo_world_through_clip_benchmark_files(tiny_world, tmp_path):
    """The world's Karpathy test splits, written as mehdidc/retrieval_annotations builds CLIP_benchmark's
    files (COCO's captions JSON cut to the test images; pandas' CSV), read back."""
    coco_test = [
        im for im in read_karpathy(tiny_world / "karpathy" / "dataset_coco.json") if im.split == "test"
    ]
    coco_json = {
        "images": [
            {"file_name": im.filename, "id": im.cocoid, "width": 640, "height": 480} for im in coco_test
        ],
        "annotations": [
            {"image_id": im.cocoid, "id": 10 * k + j, "caption": text}
            for k, im in enumerate(coco_test)
            for j, text in enumerate(im.captions)
        ],
    }
    (tmp_path / "coco_test_karpathy.json").write_text(json.dumps(coco_json))
    got = read_coco_test_karpathy(tmp_path / "coco_test_karpathy.json")
    assert len(got) == TINY_WORLD["coco"]["karpathy_test"]
    expected = sorted(coco_test, key=lambda im: im.cocoid)
    assert got == [TestImage(im.filename, im.captions) for im in expected]

    flickr_test = [
        im for im in read_karpathy(tiny_world / "karpathy" / "dataset_flickr30k.json") if im.split == "test"
    ]
    with open(tmp_path / "flickr30k_test_karpathy.txt", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows([im.filename, text] for im in flickr_test for text in im.captions)
    got = read_flickr30k_test_karpathy(tmp_path / "flickr30k_test_karpathy.txt")
    assert len(got) == TINY_WORLD["flickr30k"]["test"]
    assert got == [TestImage(im.filename, im.captions) for im in flickr_test]

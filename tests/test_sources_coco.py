"""The COCO reader (pipeline/sources/coco.py): captions files of both schemas, the image folders of
both layouts, and the demo world's COCO read back."""

from __future__ import annotations

import shutil

from pipeline.sources import CocoImage, index_images, read_captions

from .helpers import FIXTURES, MAN_ON_MOPED, TINY_WORLD, touch

# --- COCO ------------------------------------------------------------------------------------


def test_read_captions_2014_schema():
    images = read_captions(FIXTURES / "captions_val2014.json")
    assert list(images) == [391895, 522418, 42]  # the file's order
    assert images[391895] == CocoImage(391895, "COCO_val2014_000000391895.jpg", 640, 360, MAN_ON_MOPED)
    assert images[522418] == CocoImage(
        522418,
        "COCO_val2014_000000522418.jpg",
        640,
        480,
        ("A woman wearing a net on her head cutting a cake. ", "A woman cutting a large white sheet cake."),
    )
    assert images[42] == CocoImage(42, "COCO_val2014_000000000042.jpg", 500, 375, ())  # no captions: kept


def test_read_captions_2017_schema():
    images = read_captions(str(FIXTURES / "captions_train2017.json"))
    assert images == {
        391895: CocoImage(391895, "000000391895.jpg", 640, 360, MAN_ON_MOPED[:1]),
        9: CocoImage(
            9,
            "000000000009.jpg",
            640,
            480,
            (
                "Closeup of bins of food that include broccoli and bread.",
                "A meal is presented in brightly colored plastic trays.",
            ),
        ),
    }


def test_index_images_prefers_2017_and_reads_both_layouts(tmp_path):
    coco = tmp_path / "coco"
    expected = {
        391895: touch(coco / "train2017" / "000000391895.jpg"),
        42: touch(coco / "val2017" / "000000000042.jpg"),
        9: touch(coco / "train2014" / "COCO_train2014_000000000009.jpg"),
        522418: touch(coco / "val2014" / "COCO_val2014_000000522418.jpg"),
    }
    touch(coco / "val2014" / "COCO_val2014_000000391895.jpg")  # the same picture, 2014 layout
    touch(coco / "train2017" / ".DS_Store")
    touch(coco / "val2014" / "README.txt")
    touch(coco / "train2017" / "nested" / "000000000077.jpg")  # no recursion
    touch(coco / "test2017" / "000000000001.jpg")  # not a captioned split
    assert index_images(coco) == expected
    shutil.rmtree(coco / "train2017")
    assert index_images(str(coco))[391895] == coco / "val2014" / "COCO_val2014_000000391895.jpg"
    assert index_images(tmp_path / "nothing-here") == {}


# --- the demo world, read back with the reader -----------------------------------------------


def test_demo_world_coco(tiny_world):
    c = TINY_WORLD["coco"]
    coco = tiny_world / "coco"
    by_split = {
        s: read_captions(coco / "annotations" / f"captions_{s}.json") for s in ("train2017", "val2017")
    }
    assert len(by_split["val2017"]) == c["val2017"]
    assert len(by_split["train2017"]) == c["train2014"] + c["val2014"] - c["val2017"]
    index = index_images(coco)
    assert len(index) == c["train2014"] + c["val2014"]
    for split, images in by_split.items():
        for image in images.values():
            assert len(image.captions) == 5
            assert index[image.id] == coco / split / image.file_name

"""The Karpathy splits reader (pipeline/sources/karpathy.py): COCO's and Flickr30k's dataset_*.json,
and the demo world's read back."""

from __future__ import annotations

from collections import Counter

from pipeline.sources import KarpathyImage, index_images, read_captions, read_karpathy

from .helpers import FIXTURES, MAN_ON_MOPED, TINY_WORLD

# --- Karpathy splits -------------------------------------------------------------------------


def test_read_karpathy_coco():
    assert read_karpathy(FIXTURES / "dataset_coco.json") == [
        KarpathyImage("coco", "test", "COCO_val2014_000000391895.jpg", "val2014", 391895, MAN_ON_MOPED),
        KarpathyImage(
            "coco",
            "restval",
            "COCO_val2014_000000522418.jpg",
            "val2014",
            522418,
            ("A woman wearing a net on her head cutting a cake. ",),
        ),
        KarpathyImage(
            "coco",
            "val",
            "COCO_val2014_000000000042.jpg",
            "val2014",
            42,
            ("A dog sleeping on a pair of shoes.",),
        ),
        KarpathyImage("coco", "train", "COCO_train2014_000000000009.jpg", "train2014", 9, ()),
    ]


def test_read_karpathy_flickr30k():
    assert read_karpathy(FIXTURES / "dataset_flickr30k.json") == [
        KarpathyImage(
            "flickr30k",
            "train",
            "1000092795.jpg",
            None,
            None,
            (
                "Two young guys with shaggy hair look at their hands.",
                "Two young, White males are outside near many bushes.",
            ),
        ),
        KarpathyImage(
            "flickr30k",
            "test",
            "1007129816.jpg",
            None,
            None,
            ("A man in an orange hat starring at something.",),
        ),
    ]


# --- the demo world, read back with the reader -----------------------------------------------


def test_demo_world_karpathy(tiny_world):
    c, f = TINY_WORLD["coco"], TINY_WORLD["flickr30k"]
    coco = read_karpathy(tiny_world / "karpathy" / "dataset_coco.json")
    restval = c["val2014"] - c["karpathy_val"] - c["karpathy_test"]
    assert Counter(im.split for im in coco) == {
        "train": c["train2014"],
        "restval": restval,
        "val": c["karpathy_val"],
        "test": c["karpathy_test"],
    }
    assert Counter(im.filepath for im in coco) == {"train2014": c["train2014"], "val2014": c["val2014"]}
    # Karpathy names 2014 files; the world has 2017 folders: resolved by COCO id, captions agree.
    index = index_images(tiny_world / "coco")
    captions = {}
    for split in ("train2017", "val2017"):
        captions.update(read_captions(tiny_world / "coco" / "annotations" / f"captions_{split}.json"))
    for im in coco:
        assert im.dataset == "coco" and im.filename == f"COCO_{im.filepath}_{im.cocoid:012d}.jpg"
        assert im.cocoid in index and im.captions == captions[im.cocoid].captions
    flickr = read_karpathy(tiny_world / "karpathy" / "dataset_flickr30k.json")
    assert Counter(im.split for im in flickr) == f
    for im in flickr:
        assert (im.dataset, im.filepath, im.cocoid, len(im.captions)) == ("flickr30k", None, None, 5)
        assert (tiny_world / "flickr30k" / "flickr30k-images" / im.filename).is_file()

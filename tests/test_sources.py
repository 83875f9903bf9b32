"""The raw-format readers: on small hand-written files in each format's real schema, on the tiny demo
world, and on malformed files, whose errors must name the file and the key."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image
from timm.data import ImageNetInfo

from pipeline.sources import (
    CocoImage,
    KarpathyImage,
    SourceError,
    TestImage,
    WebSample,
    index_images,
    iter_shards,
    read_captions,
    read_cifar,
    read_coco_test_karpathy,
    read_failures,
    read_flickr30k_test_karpathy,
    read_imagenet_val,
    read_karpathy,
)
from pipeline.world.formats import write_py2_pickle

from .conftest import TINY_WORLD

FIXTURES = Path(__file__).parent / "fixtures" / "sources"

MAN_ON_MOPED = (
    "A man with a red helmet on a small moped on a dirt road. ",
    "Man riding a motor bike on a dirt road on the countryside.",
)


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mutated(tmp_path: Path, fixture: str, mutate: Callable[[Any], object]) -> Path:
    """The fixture with one change: `mutate` edits the parsed JSON in place (its result is ignored)."""
    root = json.loads((FIXTURES / fixture).read_text())
    mutate(root)
    path = tmp_path / fixture
    path.write_text(json.dumps(root))
    return path


def test_source_error_is_a_value_error():
    assert issubclass(SourceError, ValueError)


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


# --- malformed annotation files --------------------------------------------------------------


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


# --- img2dataset shards ----------------------------------------------------------------------


def image_bytes(fmt: str, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def meta(key: str, caption: str) -> dict:
    return {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success"}


def test_iter_shards_groups_members_by_key(tmp_path):
    jpg, png, webp = image_bytes("JPEG", (255, 0, 0)), image_bytes("PNG", (0, 255, 0)), b"RIFF\x00\x00WEBP"
    m0, m1, m2 = (
        meta("000000000", "a red box"),
        meta("000000001", "Ünïcode green"),
        meta("000000002", "no image"),
    )
    write_tar(
        tmp_path / "00001.tar",  # written first, read second: shards come in name order
        [("000010000.webp", webp)],
    )
    write_tar(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", jpg),
            ("000000000.txt", b"a red box"),
            ("000000000.json", json.dumps(m0).encode()),
            ("000000000.exif.npy", b"\x93NUMPY"),  # not ours: ignored
            ("000000001.json", json.dumps(m1).encode()),
            ("000000001.PNG", png),
            ("000000001.txt", "Ünïcode green".encode()),
            ("000000002.txt", b"no image"),
            ("000000002.json", json.dumps(m2).encode()),
        ],
    )
    (tmp_path / "00000.parquet").write_bytes(b"")  # only tars are read here
    assert list(iter_shards(tmp_path)) == [
        WebSample("00000", "000000000", jpg, "a red box", m0),
        WebSample("00000", "000000001", png, "Ünïcode green", m1),
        WebSample("00000", "000000002", None, "no image", m2),
        WebSample("00001", "000010000", webp, None, {}),
    ]
    assert list(iter_shards(tmp_path / "empty")) == []


def test_iter_shards_streams(tmp_path):
    write_tar(tmp_path / "00000.tar", [("000000000.jpg", b"\xff\xd8"), ("000000001.jpg", b"\xff\xd8")])
    (tmp_path / "00001.tar").write_bytes(b"this is no tar" * 100)
    samples = iter_shards(tmp_path)
    assert [next(samples).key, next(samples).key] == ["000000000", "000000001"]  # before the bad shard
    with pytest.raises(SourceError, match=r"00001\.tar: not a readable tar file"):
        next(samples)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("000000003.json", b'{"caption": "cut')], "key '000000003': .json: not valid JSON: "),
        ([("000000003.json", b"[1, 2]")], "key '000000003': .json: expected an object, got list"),
        ([("000000003.txt", b"\xff\xfe caption")], "key '000000003': .txt: not UTF-8 text: "),
        ([("000000003.jpg", b"1"), ("000000003.png", b"2")], "key '000000003': a second image member (.png)"),
        (
            [("000000003.jpg", b"1"), ("000000004.jpg", b"2"), ("000000003.txt", b"late")],
            "key '000000003': its members are not contiguous",
        ),
    ],
)
def test_malformed_shard_names_shard_and_key(tmp_path, members, message):
    path = write_tar(tmp_path / "00007.tar", members)
    with pytest.raises(SourceError) as err:
        list(iter_shards(tmp_path))
    assert str(err.value).startswith(f"{path}: {message}")


def test_truncated_shard_is_a_source_error(tmp_path):
    path = write_tar(tmp_path / "00000.tar", [("000000000.jpg", bytes(5000)), ("000000000.txt", b"x")])
    path.write_bytes(path.read_bytes()[:3000])  # a copy cut short
    with pytest.raises(SourceError, match="^" + re.escape(f"{path}: not a readable tar file: ")):
        list(iter_shards(tmp_path))


FAILURE_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
    ]
)


def write_rows(path: Path, rows: list[dict], schema: pa.Schema = FAILURE_SCHEMA) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def row(key: str, status: str, error: str | None = None) -> dict:
    return {
        "url": f"https://example.com/{key}.jpg",
        "caption": "c",
        "key": key,
        "status": status,
        "error_message": error,
        "width": 8 if status == "success" else None,
    }


def test_read_failures(tmp_path):
    write_rows(
        tmp_path / "00000.parquet",
        [
            row("000000000", "success"),
            row("000000001", "failed_to_download", "HTTP Error 404: Not Found"),
            row("000000002", "failed_to_resize", "image too small"),
        ],
    )
    write_tar(tmp_path / "00001.tar", [])  # its parquet is missing: fine
    write_rows(tmp_path / "00002.parquet", [row("000020000", "success")])
    assert read_failures(tmp_path) == [
        {
            "shard": "00000",
            "key": "000000001",
            "url": "https://example.com/000000001.jpg",
            "status": "failed_to_download",
            "error_message": "HTTP Error 404: Not Found",
        },
        {
            "shard": "00000",
            "key": "000000002",
            "url": "https://example.com/000000002.jpg",
            "status": "failed_to_resize",
            "error_message": "image too small",
        },
    ]
    assert read_failures(tmp_path / "no-such-folder") == []


def test_read_failures_malformed(tmp_path):
    path = tmp_path / "00000.parquet"
    schema = pa.schema([f for f in FAILURE_SCHEMA if f.name != "status"])
    write_rows(path, [{"key": "0", "url": "u"}], schema)
    with pytest.raises(SourceError) as err:
        read_failures(tmp_path)
    assert str(err.value) == f"{path}: column 'status': missing"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="^" + re.escape(f"{path}: not a readable parquet file: ")):
        read_failures(tmp_path)


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


# --- CIFAR -----------------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pattern_image(seed: int) -> np.ndarray:
    """A 32×32×3 image whose every pixel and channel differ, so a layout mistake shows."""
    y, x, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((y * 7 + x * 3 + c * 101 + seed * 13) % 256).astype(np.uint8)


def cifar_row(image: np.ndarray) -> np.ndarray:
    # As CIFAR documents it: 1024 red values, then 1024 green, then 1024 blue, each row-major.
    return np.concatenate([image[:, :, 0].ravel(), image[:, :, 1].ravel(), image[:, :, 2].ravel()])


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    for b in range(1, 6):
        write_py2_pickle(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [b, 9 - b],
                "data": np.stack([cifar_row(pattern_image(2 * b)), cifar_row(pattern_image(2 * b + 1))]),
                "filenames": [f"img_{2 * b}.png", f"img_{2 * b + 1}.png"],
            },
        )
    write_py2_pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [3, 0, 9],
            "data": np.stack([cifar_row(pattern_image(s)) for s in (100, 101, 102)]),
            "filenames": ["domestic_cat_s_000907.png", "aeroplane_s_000040.png", "trucking_rig_s_001247.png"],
        },
    )
    write_py2_pickle(
        folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    )
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    for name, labels in (("train", [2, 0]), ("test", [1])):
        write_py2_pickle(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
                "batch_label": f"{name} batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [0] * len(labels),
                "data": np.stack([cifar_row(pattern_image(50 + i)) for i in range(len(labels))]),
            },
        )
    write_py2_pickle(
        folder / "meta",
        {"fine_label_names": ["apple", "aquarium_fish", "maple_tree"], "coarse_label_names": ["fruit"]},
    )
    return folder


def test_read_cifar10(tmp_path):
    write_cifar10(tmp_path)
    names, images, labels = read_cifar(tmp_path, "cifar10", "train")
    assert names == CIFAR10_NAMES
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3) and images.flags.c_contiguous
    np.testing.assert_array_equal(images, np.stack([pattern_image(s) for s in range(2, 12)]))
    assert labels == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    names, images, labels = read_cifar(str(tmp_path / "cifar-10-batches-py"), "cifar10", "test")
    np.testing.assert_array_equal(images, np.stack([pattern_image(s) for s in (100, 101, 102)]))
    assert labels == [3, 0, 9]


def test_read_cifar100_fine_labels_and_spaced_names(tmp_path):
    write_cifar100(tmp_path)
    names, images, labels = read_cifar(tmp_path, "cifar100", "train")
    assert names == ["apple", "aquarium fish", "maple tree"]
    assert labels == [2, 0]
    np.testing.assert_array_equal(images, np.stack([pattern_image(50), pattern_image(51)]))
    assert read_cifar(tmp_path, "cifar100", "test")[2] == [1]


def test_read_cifar_accepts_str_keys(tmp_path):
    # A copy re-pickled under Python 3 has str keys, not Python 2's byte strings.
    folder = write_cifar100(tmp_path)
    data = np.stack([cifar_row(pattern_image(9))])
    with open(folder / "test", "wb") as f:
        pickle.dump({"fine_labels": [2], "data": data}, f, protocol=2)
    _, images, labels = read_cifar(tmp_path, "cifar100", "test")
    np.testing.assert_array_equal(images[0], pattern_image(9))
    assert labels == [2]


def _cifar_case(batch: dict) -> dict:
    return {"batch_label": "testing batch 1 of 1", **batch}


ROWS = np.stack([cifar_row(pattern_image(0)), cifar_row(pattern_image(1))])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"labels": [0, 1]}, "data: missing"),
        ({"data": ROWS}, "labels: missing"),
        (
            {"data": ROWS[:, :3000], "labels": [0, 1]},
            "data: expected a uint8 array of shape (N, 3072), got uint8 array of shape (2, 3000)",
        ),
        (
            {"data": ROWS.astype(np.int64), "labels": [0, 1]},
            "data: expected a uint8 array of shape (N, 3072), got int64 array of shape (2, 3072)",
        ),
        ({"data": [1, 2], "labels": [0, 1]}, "data: expected a uint8 array of shape (N, 3072), got list"),
        ({"data": ROWS, "labels": [0]}, "labels: expected a list of 2 labels, got 1 labels"),
        ({"data": ROWS, "labels": (0, 1)}, "labels: expected a list of 2 labels, got tuple"),
        ({"data": ROWS, "labels": [0, 10]}, "labels[1]: expected a class index below 10, got 10"),
        ({"data": ROWS, "labels": [-1, 0]}, "labels[0]: expected a class index below 10, got -1"),
    ],
)
def test_malformed_cifar_batch(tmp_path, batch, message):
    folder = write_cifar10(tmp_path)
    write_py2_pickle(folder / "test_batch", _cifar_case(batch))
    with pytest.raises(SourceError) as err:
        read_cifar(tmp_path, "cifar10", "test")
    assert str(err.value) == f"{folder / 'test_batch'}: {message}"


def test_malformed_cifar_files(tmp_path):
    folder = write_cifar10(tmp_path)
    meta = folder / "batches.meta"
    write_py2_pickle(meta, {"num_vis": 3072})
    with pytest.raises(SourceError) as err:
        read_cifar(tmp_path, "cifar10", "test")
    assert str(err.value) == f"{meta}: label_names: missing"
    write_py2_pickle(meta, {"label_names": "airplane"})
    with pytest.raises(SourceError, match=r"label_names: expected a list of strings, got bytes"):
        read_cifar(tmp_path, "cifar10", "test")
    write_py2_pickle(meta, [CIFAR10_NAMES])
    with pytest.raises(SourceError, match=r"batches\.meta: expected a dict, got list"):
        read_cifar(tmp_path, "cifar10", "test")
    meta.write_bytes(b"\x80\x02}q\x00(U")  # cut short
    with pytest.raises(SourceError, match=r"batches\.meta: not a CIFAR pickle: "):
        read_cifar(tmp_path, "cifar10", "test")


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_may_not_run_code(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": _RunsCode()}, protocol=2))
    with pytest.raises(SourceError, match=r"not a CIFAR pickle: refusing to load global posix\.getcwd"):
        read_cifar(tmp_path, "cifar10", "test")


def test_read_cifar_unknown_set(tmp_path):
    with pytest.raises(ValueError, match="unknown CIFAR set"):
        read_cifar(tmp_path, "cifar10", "val")


# --- the demo world, read back with the readers ----------------------------------------------


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


def test_demo_world_img2dataset(tiny_world):
    c = TINY_WORLD["cc"]
    samples = list(iter_shards(tiny_world / "cc"))
    n_shards = -(-c["samples"] // c["shard_size"])
    assert len(samples) == c["samples"] - c["failed"]
    assert sorted({s.shard for s in samples}) == [f"{i:05d}" for i in range(n_shards)]
    for s in samples:
        assert s.image is not None and hashlib.sha256(s.image).hexdigest() == s.meta["sha256"]
        assert s.caption == s.meta["caption"] and s.key == s.meta["key"] and s.meta["status"] == "success"
    failures = read_failures(tiny_world / "cc")
    assert len(failures) == c["failed"]
    assert {f["status"] for f in failures} == {"failed_to_download"}
    keys = {s.key for s in samples} | {f["key"] for f in failures}
    assert len(keys) == c["samples"]


def test_demo_world_imagenet(tiny_world):
    per = TINY_WORLD["zeroshot"]["imagenet_per_class"]
    classnames, samples = read_imagenet_val(tiny_world / "imagenet" / "val")
    assert len(classnames) == 100 and classnames[0] == "red circle"
    assert len(samples) == 100 * per
    assert Counter(label for _, label in samples) == {k: per for k in range(100)}
    assert all(path.is_file() and path.suffix == ".JPEG" for path, _ in samples)


@pytest.mark.parametrize(
    ("name", "split", "n_classes", "per_class"),
    [
        ("cifar10", "train", 10, "cifar10_train_per_class"),
        ("cifar10", "test", 10, "cifar10_test_per_class"),
        ("cifar100", "train", 100, "cifar100_train_per_class"),
        ("cifar100", "test", 100, "cifar100_test_per_class"),
    ],
)
def test_demo_world_cifar(tiny_world, name, split, n_classes, per_class):
    per = TINY_WORLD["zeroshot"][per_class]
    classnames, images, labels = read_cifar(tiny_world, name, split)
    assert len(classnames) == n_classes and not any("_" in n for n in classnames)
    assert images.shape == (n_classes * per, 32, 32, 3) and images.dtype == np.uint8
    assert Counter(labels) == {k: per for k in range(n_classes)}

"""Every file of the tiny demo world, read back by small independent readers (or by the field's
own libraries: torchvision's ImageFolder, webdataset, pyarrow, ultralytics), checked against the
params that made it."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demo.pretrain import generate_pretrain_split
from pipeline.demo.world.captions import plural
from pipeline.demo.world.generate import generate_world
from pipeline.demo.world.paint import CIFAR10_TEST, Job, make_sample
from pipeline.demo.world.scene import SHAPES, WARM_COLOURS

from .helpers import TINY_WORLD


def load(path: Path):
    return json.loads(path.read_text())


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- COCO ------------------------------------------------------------------------------------


def coco_files(world: Path) -> dict[str, dict]:
    return {
        split: load(world / "coco" / "annotations" / f"captions_{split}.json")
        for split in ("train2017", "val2017")
    }


def test_coco_2017_captions_schema_and_files(tiny_world):
    c = TINY_WORLD["coco"]
    files = coco_files(tiny_world)
    assert len(files["val2017"]["images"]) == c["val2017"]
    assert len(files["train2017"]["images"]) == c["train2014"] + c["val2014"] - c["val2017"]
    ids, ann_ids = set(), set()
    for split, data in files.items():
        assert set(data) == {"info", "licenses", "images", "annotations"}
        assert data["info"]["year"] == 2017
        license_ids = {lic["id"] for lic in data["licenses"]}
        per_image = Counter(a["image_id"] for a in data["annotations"])
        for im in data["images"]:
            assert {
                "id",
                "file_name",
                "width",
                "height",
                "license",
                "coco_url",
                "date_captured",
                "flickr_url",
            } <= set(im)
            assert im["file_name"] == f"{im['id']:012d}.jpg" and im["license"] in license_ids
            with Image.open(tiny_world / "coco" / split / im["file_name"]) as img:
                assert img.format == "JPEG" and img.size == (im["width"], im["height"]) and img.mode == "RGB"
            assert per_image[im["id"]] == 5
            ids.add(im["id"])
        for a in data["annotations"]:
            assert set(a) == {"image_id", "id", "caption"} and a["caption"].strip()
            ann_ids.add(a["id"])
    assert len(ids) == c["train2014"] + c["val2014"]
    assert len(ann_ids) == 5 * len(ids)


def test_karpathy_coco_splits_name_2014_files_and_match_coco(tiny_world):
    c = TINY_WORLD["coco"]
    data = load(tiny_world / "karpathy" / "dataset_coco.json")
    assert data["dataset"] == "coco"
    images = data["images"]
    assert Counter(im["split"] for im in images) == {
        "train": c["train2014"], "val": c["karpathy_val"], "test": c["karpathy_test"],
        "restval": c["val2014"] - c["karpathy_val"] - c["karpathy_test"],
    }  # fmt: skip
    captions_by_id = {}
    where = {}
    for split, d in coco_files(tiny_world).items():
        for a in d["annotations"]:
            captions_by_id.setdefault(a["image_id"], []).append(a["caption"])
        where.update({im["id"]: split for im in d["images"]})
    sentids = []
    for imgid, im in enumerate(images):
        assert im["imgid"] == imgid
        assert im["filename"] == f"COCO_{im['filepath']}_{im['cocoid']:012d}.jpg"
        assert (im["filepath"] == "train2014") == (im["split"] == "train")
        assert [s["raw"] for s in im["sentences"]] == captions_by_id[im["cocoid"]]
        for s in im["sentences"]:
            assert s["imgid"] == imgid and s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        sentids += im["sentids"]
    assert sentids == list(range(len(sentids)))
    # As in reality, most Karpathy test images sit in the 2017 *train* annotations.
    test_in_train = sum(where[im["cocoid"]] == "train2017" for im in images if im["split"] == "test")
    world = load(tiny_world / "world.json")
    assert test_in_train == world["coco"]["karpathy_test_in_train2017"] > 0
    # val2017 images all come from val2014.
    assert all(im["filepath"] == "val2014" for im in images if where[im["cocoid"]] == "val2017")


# --- Flickr30k -------------------------------------------------------------------------------


def test_flickr30k_karpathy_json_and_image_folder(tiny_world):
    f = TINY_WORLD["flickr30k"]
    data = load(tiny_world / "karpathy" / "dataset_flickr30k.json")
    assert data["dataset"] == "flickr30k"
    assert Counter(im["split"] for im in data["images"]) == f
    folder = tiny_world / "flickr30k" / "flickr30k-images"
    assert sorted(p.name for p in folder.iterdir()) == sorted(im["filename"] for im in data["images"])
    for im in data["images"]:
        assert set(im) == {"sentids", "imgid", "sentences", "split", "filename"}
        assert re.fullmatch(r"\d{10}\.jpg", im["filename"]) and len(im["sentences"]) == 5
        assert all(s["raw"].endswith(".") and s["raw"][0].isupper() for s in im["sentences"])


def test_clip_benchmark_test_files_hold_the_karpathy_test_sets(tiny_world):
    from pipeline.sources import read_coco_test_karpathy, read_flickr30k_test_karpathy

    for dataset, reader, name in (
        ("coco", read_coco_test_karpathy, "coco_test_karpathy.json"),
        ("flickr30k", read_flickr30k_test_karpathy, "flickr30k_test_karpathy.txt"),
    ):
        karpathy = load(tiny_world / "karpathy" / f"dataset_{dataset}.json")["images"]
        want = {
            im["filename"]: tuple(s["raw"] for s in im["sentences"])
            for im in karpathy
            if im["split"] == "test"
        }
        got = reader(tiny_world / "karpathy" / name)
        assert {t.filename: t.captions for t in got} == want
        assert len(got) == TINY_WORLD[dataset]["karpathy_test" if dataset == "coco" else "test"]
    # CLIP_benchmark's COCO file is captions_val2014.json cut down: ids sorted, unique annotation ids.
    doc = load(tiny_world / "karpathy" / "coco_test_karpathy.json")
    ids = [im["id"] for im in doc["images"]]
    assert ids == sorted(ids) and len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])


# --- Conceptual Captions (img2dataset) --------------------------------------------------------


def test_cc_img2dataset_shards(tiny_world):
    import webdataset as wds

    cc = TINY_WORLD["cc"]
    folder = tiny_world / "cc"
    n_shards = -(-cc["samples"] // cc["shard_size"])
    assert sorted(p.name for p in folder.glob("*.tar")) == [f"{i:05d}.tar" for i in range(n_shards)]
    rows = []
    for shard in range(n_shards):
        table = pq.read_table(folder / f"{shard:05d}.parquet").to_pylist()
        stats = load(folder / f"{shard:05d}_stats.json")
        ok = [r for r in table if r["status"] == "success"]
        assert stats["count"] == len(table) and stats["successes"] == len(ok)
        assert stats["failed_to_download"] == len(table) - len(ok)
        samples = list(wds.WebDataset(str(folder / f"{shard:05d}.tar"), shardshuffle=False))
        assert [s["__key__"] for s in samples] == [r["key"] for r in ok]
        for s, r in zip(samples, ok):
            assert {"jpg", "txt", "json"} <= set(s)
            meta = json.loads(s["json"])
            assert meta["key"] == r["key"] and s["txt"].decode() == r["caption"] == meta["caption"]
            assert hashlib.sha256(s["jpg"]).hexdigest() == r["sha256"]
        for r in table:
            if r["status"] != "success":
                assert r["status"] == "failed_to_download" and r["error_message"] and r["width"] is None
        rows += table
    assert len(rows) == cc["samples"]
    assert sum(r["status"] != "success" for r in rows) == cc["failed"]
    assert len({r["key"] for r in rows}) == cc["samples"]


def test_cc_has_exactly_the_planted_corrupt_jpegs(tiny_world):
    broken = 0
    for shard in sorted((tiny_world / "cc").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                assert member.mtime == 0 and member.uname == ""
                if member.name.endswith(".jpg"):
                    try:
                        Image.open(io.BytesIO(tar.extractfile(member).read())).load()
                    except OSError:
                        broken += 1
    assert broken == TINY_WORLD["cc"]["corrupt"]


# --- overlaps planted for the leakage guard ---------------------------------------------------


def read_world_file(world: Path, ref: str) -> bytes:
    if ".tar:" in ref:
        shard, key = ref.split(":")
        with tarfile.open(world / shard) as tar:
            return tar.extractfile(f"{key}.jpg").read()
    return (world / ref).read_bytes()


def test_planted_duplicates_are_byte_identical_copies_of_test_images(tiny_world):
    planted = load(tiny_world / "world.json")["planted_duplicates"]
    assert len(planted) == 2 * TINY_WORLD["planted_duplicates"]
    karpathy = {
        name: load(tiny_world / "karpathy" / f"dataset_{name}.json")["images"]
        for name in ("coco", "flickr30k")
    }
    test_files = {f"{im['cocoid']:012d}.jpg" for im in karpathy["coco"] if im["split"] == "test"}
    test_files |= {im["filename"] for im in karpathy["flickr30k"] if im["split"] == "test"}
    for p in planted:
        assert read_world_file(tiny_world, p["copy"]) == read_world_file(tiny_world, p["of"])
        assert Path(p["of"]).name in test_files


# --- zero-shot sets ---------------------------------------------------------------------------


def test_imagenet_val_folder_reads_with_torchvision(tiny_world):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(tiny_world / "imagenet" / "val"))
    assert len(ds.classes) == 100
    assert Counter(ds.targets) == {k: TINY_WORLD["zeroshot"]["imagenet_per_class"] for k in range(100)}
    mapping = [
        line.split(" ", 1)
        for line in (tiny_world / "imagenet" / "LOC_synset_mapping.txt").read_text().splitlines()
    ]
    assert [wnid for wnid, _ in mapping] == ds.classes
    assert mapping[0][1] == "red circle" and all(re.fullmatch(r"n\d{8}", w) for w, _ in mapping)
    assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", Path(p).name) for p, _ in ds.samples)


@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_cifar10_pickles_read_like_the_real_ones(tiny_world, encoding):
    def key(k):
        return k.encode() if encoding == "bytes" else k

    folder = tiny_world / "cifar-10-batches-py"
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding=encoding)
    names = [n.decode() if isinstance(n, bytes) else n for n in meta[key("label_names")]]
    assert names == list(SHAPES)
    train_n = 0
    for b in range(1, 6):
        with open(folder / f"data_batch_{b}", "rb") as f:
            batch = pickle.load(f, encoding=encoding)
        assert batch[key("data")].dtype == np.uint8 and batch[key("data")].shape[1] == 3072
        train_n += len(batch[key("labels")])
    assert train_n == 10 * TINY_WORLD["zeroshot"]["cifar10_train_per_class"]
    with open(folder / "test_batch", "rb") as f:
        test = pickle.load(f, encoding=encoding)
    assert Counter(test[key("labels")]) == {
        k: TINY_WORLD["zeroshot"]["cifar10_test_per_class"] for k in range(10)
    }
    # Row layout: the red plane, then green, then blue, each 32×32 row-major — checked against a
    # fresh drawing of the first test image.
    image = test[key("data")][0].reshape(3, 32, 32).transpose(1, 2, 0)
    label = test[key("labels")][0]
    colours = list(json.loads((tiny_world / "world.json").read_text())["vocabulary"]["colours"])
    redraw = [
        make_sample(
            Job(CIFAR10_TEST, 0, single=(c, SHAPES[label]), size=(32, 32), raw=True, domain="web"),
            7,
            (96, 128),
            4,
        )
        for c in colours
    ]
    assert any(np.array_equal(image, r.data) for r in redraw)


def test_cifar100_pickles(tiny_world):
    folder = tiny_world / "cifar-100-python"
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    fine, coarse = meta["fine_label_names"], meta["coarse_label_names"]
    assert len(fine) == 100 and len(coarse) == 20 and fine == sorted(fine) and "red_circle" in fine
    for name, per in (("train", "cifar100_train_per_class"), ("test", "cifar100_test_per_class")):
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        assert set(d) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
        assert d["data"].shape == (100 * TINY_WORLD["zeroshot"][per], 3072)
        for fl, cl in zip(d["fine_labels"], d["coarse_labels"]):
            colour, shape = fine[fl].split("_")
            assert coarse[cl] == f"{'warm' if colour in WARM_COLOURS else 'cool'}_{plural(shape)}"


# --- ground truth, determinism, the pretraining split -----------------------------------------


def test_ground_truth_boxes_lie_in_their_images(tiny_world):
    rows = pq.read_table(tiny_world / "ground_truth.parquet").to_pylist()
    assert rows
    files = {r["file"] for r in rows}
    assert any(f.startswith("coco/") for f in files) and any(f.startswith("cc/") for f in files)
    for r in rows:
        assert 0 <= r["x0"] < r["x1"] <= r["width"] and 0 <= r["y0"] < r["y1"] <= r["height"]
        assert 0 < r["visible"] <= 1 and r["shape"] in SHAPES
    some = next(r for r in rows if r["file"].startswith("flickr30k/"))
    with Image.open(tiny_world / some["file"]) as img:
        assert img.size == (some["width"], some["height"])


def test_same_seed_gives_byte_identical_world_whatever_the_worker_count(tiny_world, tiny_world_cfg, tmp_path):
    again = generate_world(tiny_world_cfg, tmp_path / "raw", workers=1, progress=False)
    assert again == load(tiny_world / "world.json")
    assert tree_digest(tmp_path / "raw") == tree_digest(tiny_world)
    other = generate_world(tiny_world_cfg.model_copy(update={"seed": 8}), tmp_path / "other", progress=False)
    assert other["planted_duplicates"] != again["planted_duplicates"]


def test_pretrain_split_is_an_ultralytics_dataset_with_true_labels(tiny_world, tiny_world_cfg, tmp_path):
    from ultralytics.data.utils import check_det_dataset

    out = tmp_path / "pretrain"
    generate_pretrain_split(tiny_world_cfg, out, n_train=6, n_val=2, progress=False)
    data = check_det_dataset(str(out / "data.yaml"))
    assert data["nc"] == len(SHAPES) and data["names"][0] == "circle"
    lines = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(len(x["captions"]) == 5 for x in lines)
    for x in lines:
        image = out / x["image"]
        label = out / x["image"].replace("images/", "labels/").replace(".jpg", ".txt")
        boxes = [list(map(float, line.split())) for line in label.read_text().splitlines()]
        assert 1 <= len(boxes) <= 4
        for c, cx, cy, w, h in boxes:
            assert int(c) == c and 0 <= c < len(SHAPES)
            assert 0 < w <= 1 and 0 < h <= 1
            assert (
                -1e-6 <= cx - w / 2
                and cx + w / 2 <= 1 + 1e-6
                and -1e-6 <= cy - h / 2
                and cy + h / 2 <= 1 + 1e-6
            )
        with Image.open(image) as img:
            assert img.format == "JPEG"
    # A seed stream of its own: no pretraining image is a pipeline image.
    world_hashes = set(tree_digest(tiny_world).values())
    assert not {hashlib.sha256((out / x["image"]).read_bytes()).hexdigest() for x in lines} & world_hashes


def test_pretrain_single_object_tail_keeps_the_other_images_unchanged(tiny_world_cfg, tmp_path):
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    generate_pretrain_split(tiny_world_cfg, plain, n_train=10, n_val=2, progress=False)
    summary = generate_pretrain_split(
        tiny_world_cfg, mixed, n_train=10, n_val=2, single_object_fraction=0.3, progress=False
    )
    assert summary["single_object_train"] == 3
    assert json.loads((mixed / "split.json").read_text()) == summary
    for i in range(10):
        name = f"{i:07d}"
        label = (mixed / "labels" / "train" / f"{name}.txt").read_text().splitlines()
        same = (mixed / "images" / "train" / f"{name}.jpg").read_bytes() == (
            plain / "images" / "train" / f"{name}.jpg"
        ).read_bytes()
        if i < 7:
            assert same  # the multi-object head is the same drawing as without the tail
        else:
            assert len(label) == 1 and not same
    assert tree_digest(mixed / "images" / "val") == tree_digest(plain / "images" / "val")
    with pytest.raises(ValueError, match="single_object_fraction"):
        generate_pretrain_split(tiny_world_cfg, tmp_path / "bad", 4, 1, single_object_fraction=1.5)

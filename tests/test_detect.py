"""detect: boxes equal to YOLO.predict()'s, rows for every image (no detection, greyscale, odd
shapes, rejects), resume after a kill, and params that are refused with their key named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import pipeline.detect as det
from pipeline.config import ParamsError, parse_params
from pipeline.detect import REGIONS_SCHEMA, Settings
from pipeline.errors import InputError
from pipeline.models import detector as yolo
from pipeline.shards import ShardWriter

from .helpers import REPO, sample_starts

WEIGHTS = REPO / "demo" / "weights" / "yolo-demo-v8n.pt"
IMGSZ = 160  # the demo detector's training size
ALL = Settings(conf=0.25, iou=0.7, classes=None, max_regions=300, min_area_fraction=0.0, batch_size=8)


@pytest.fixture(scope="module")
def model() -> yolo.Detector:
    return yolo.load("yolov8n.yaml", str(WEIGHTS), IMGSZ, "cpu")


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


@pytest.fixture(scope="module")
def demo_images(tiny_world) -> list[tuple[str, bytes]]:
    paths = sorted((tiny_world / "coco" / "train2017").glob("*.jpg"))[:24]
    paths += sorted((tiny_world / "flickr30k" / "flickr30k-images").glob("*.jpg"))[:8]
    return [(f"img-{p.stem}", p.read_bytes()) for p in paths]


def write_shard(folder: Path, samples: list[tuple[str, dict]], name: str = "00000.tar") -> Path:
    """One shard named `name`; an empty list gives an empty tar (a writer that got no sample
    writes no shard)."""
    path = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    if not samples:
        tarfile.open(path, "w").close()
        return path
    with ShardWriter(folder / ".build", max_count=len(samples)) as w:
        for key, fields in samples:
            w.write(key, fields)
    (folder / ".build" / "00000.tar").rename(path)
    (folder / ".build").rmdir()
    return path


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def rows_by_key(table) -> dict[str, dict]:
    return {r["key"]: r for r in table.to_pylist()}


# --- correct when fast --------------------------------------------------------------------------


def test_boxes_equal_those_of_yolo_predict(model, pool, demo_images, tmp_path):
    from ultralytics import YOLO

    shard = write_shard(tmp_path, [(k, {"jpg": b}) for k, b in demo_images])
    table = det.detect_shard(shard, model, ALL, pool)
    assert table.schema.equals(REGIONS_SCHEMA)
    assert table.column("key").to_pylist() == [k for k, _ in demo_images]
    reference = YOLO(str(WEIGHTS))
    found = 0
    for (key, data), row in zip(demo_images, table.to_pylist()):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        # One image at a time, as a user would call it: ultralytics letterboxes it to a
        # rectangle rather than our batch's square, so boxes may move by a fraction of a pixel.
        ref = reference.predict(img, imgsz=IMGSZ, conf=ALL.conf, iou=ALL.iou, device="cpu", verbose=False)[0]
        assert row["regions"] == len(ref.boxes) == len(row["boxes"]), key
        assert (row["width"], row["height"]) == img.size
        if not len(ref.boxes):
            continue
        found += len(ref.boxes)
        # Near-equal confidences may come in another order: pair each box with its nearest.
        ours, theirs = np.array(row["boxes"]), ref.boxes.xyxy.numpy()
        match = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=2).argmin(axis=0)
        assert sorted(match.tolist()) == list(range(len(theirs))), key
        np.testing.assert_allclose(ours[match], theirs, atol=1.0, err_msg=key)
        np.testing.assert_allclose(np.array(row["confidences"])[match], ref.boxes.conf.numpy(), atol=0.02)
        assert np.array(row["classes"])[match].tolist() == ref.boxes.cls.numpy().astype(int).tolist(), key
        assert row["class_names"] == [reference.names[c] for c in row["classes"]]
    assert found >= len(demo_images)  # every demo image holds at least one shape


def test_a_batch_gives_predicts_batch_boxes_exactly(model, pool, demo_images, tmp_path):
    """predict() on a list of differently sized images letterboxes to the square, as we do."""
    from ultralytics import YOLO

    shard = write_shard(tmp_path, [(k, {"jpg": b}) for k, b in demo_images[:8]])
    rows = det.detect_shard(shard, model, ALL, pool).to_pylist()
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for _, b in demo_images[:8]]
    assert len({i.size for i in imgs}) > 1
    refs = YOLO(str(WEIGHTS)).predict(
        imgs, imgsz=IMGSZ, conf=ALL.conf, iou=ALL.iou, device="cpu", verbose=False
    )
    for row, ref in zip(rows, refs):
        np.testing.assert_allclose(np.array(row["boxes"]).reshape(-1, 4), ref.boxes.xyxy.numpy(), atol=1e-3)


def test_area_filter_and_max_regions_keep_the_most_confident(model, pool, demo_images, tmp_path):
    shard = write_shard(tmp_path, [(k, {"jpg": b}) for k, b in demo_images])
    full = det.detect_shard(shard, model, ALL, pool).to_pylist()
    some = Settings(conf=0.25, iou=0.7, classes=None, max_regions=1, min_area_fraction=0.05, batch_size=8)
    cut = det.detect_shard(shard, model, some, pool).to_pylist()
    assert sum(r["regions"] for r in cut) < sum(r["regions"] for r in full)
    for a, b in zip(full, cut):
        area = [(x2 - x1) * (y2 - y1) / (a["width"] * a["height"]) for x1, y1, x2, y2 in a["boxes"]]
        expected = [box for box, f in zip(a["boxes"], area) if f >= 0.05][:1]
        assert b["boxes"] == expected
        assert b["confidences"] == sorted(b["confidences"], reverse=True)


def test_normalised_boxes_and_class_filter(model, pool, demo_images, tmp_path):
    shard = write_shard(tmp_path, [(k, {"jpg": b}) for k, b in demo_images])
    full = det.detect_shard(shard, model, ALL, pool).to_pylist()
    for r in full:
        scale = np.array([r["width"], r["height"]] * 2)
        np.testing.assert_allclose(
            np.array(r["boxes_norm"]).reshape(-1, 4) * scale, np.array(r["boxes"]).reshape(-1, 4), rtol=1e-5
        )
        assert all(0 <= v <= 1 for box in r["boxes_norm"] for v in box)
    common = max(
        {c for r in full for c in r["classes"]}, key=lambda c: sum(r["classes"].count(c) for r in full)
    )
    ids = model.class_ids([model.names[common]])
    assert ids == [common] == model.class_ids([common])
    only = Settings(**{**ALL.__dict__, "classes": tuple(ids)})
    filtered = det.detect_shard(shard, model, only, pool).to_pylist()
    assert all(set(r["classes"]) <= {common} for r in filtered)
    assert sum(r["regions"] for r in filtered) == sum(r["classes"].count(common) for r in full)
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['unicorn', 99\]"):
        model.class_ids(["unicorn", 99, "star"])


# --- every image gets a row ----------------------------------------------------------------------


def test_odd_images_and_rejects_get_rows_and_the_shard_goes_on(model, pool, demo_images, tmp_path):
    key0, good = demo_images[0]
    demo = Image.open(io.BytesIO(good)).convert("RGB")
    grey16 = Image.fromarray(np.asarray(demo.convert("L")).astype(np.uint16) * 257)
    samples = [
        ("blank", {"jpg": encode(Image.new("RGB", (120, 100), (255, 255, 255)))}),
        ("truncated", {"jpg": good[: len(good) // 2]}),
        ("grey", {"jpg": encode(demo.convert("L"))}),
        ("grey16", {"png": encode(grey16, "PNG")}),
        ("garbage", {"jpg": b"this is not an image"}),
        ("caption-only", {"txt": "a caption without its image"}),
        ("wide", {"jpg": encode(demo.resize((1200, 12)))}),
        ("tall", {"png": encode(demo.resize((1, 300)), "PNG")}),
        (key0, {"jpg": good}),
    ]
    shard = write_shard(tmp_path, samples)
    table = det.detect_shard(shard, model, ALL, pool)
    rows = rows_by_key(table)
    assert list(rows) == [k for k, _ in samples]
    assert table.column("shard").to_pylist() == ["00000.tar"] * len(samples)

    rejected = {k: (r["reject"], r["width"]) for k, r in rows.items() if r["reject"]}
    assert rejected == {
        "truncated": ("truncated", None),
        "garbage": ("not_an_image", None),
        "caption-only": ("no_image", None),
    }
    for key in rejected:
        assert rows[key]["regions"] == 0 and rows[key]["boxes"] == [] and rows[key]["reject_detail"]

    assert rows["blank"]["reject"] is None and rows["blank"]["regions"] == 0 and rows["blank"]["boxes"] == []
    assert (rows["blank"]["width"], rows["blank"]["height"]) == (120, 100)
    # The image after the rejects is detected as it is alone (up to the last bits: batch of 6 vs 1).
    assert rows[key0]["regions"] > 0
    alone = det.detect_shard(write_shard(tmp_path / "alone", [samples[-1]]), model, ALL, pool).to_pylist()[0]
    np.testing.assert_allclose(rows[key0]["boxes"], alone["boxes"], atol=1e-3)
    # Greyscale becomes RGB and is still detected; odd shapes give boxes inside their image.
    assert rows["grey"]["regions"] > 0 and rows["grey16"]["regions"] > 0
    for key, size in (("wide", (1200, 12)), ("tall", (1, 300))):
        r = rows[key]
        assert r["reject"] is None and (r["width"], r["height"]) == size
        for x1, y1, x2, y2 in r["boxes"]:
            assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]


def test_an_empty_shard_gives_no_rows(model, pool, demo_images, tmp_path):
    empty = write_shard(tmp_path / "shards", [], "00000.tar")
    full = write_shard(tmp_path / "shards", [(k, {"jpg": b}) for k, b in demo_images[:3]], "00001.tar")
    assert det.detect_shard(empty, model, ALL, pool).num_rows == 0
    metrics = det.detect(
        [empty, full], tmp_path / "regions.parquet", tmp_path / "scratch", model, ALL, 2, False
    )
    table = pq.read_table(tmp_path / "regions.parquet")
    assert table.schema.equals(REGIONS_SCHEMA) and table.num_rows == 3
    assert metrics["shards"] == 2 and metrics["images"] == 3 and metrics["rejects"] == 0


# --- resumable ---------------------------------------------------------------------------------


@pytest.fixture
def three_shards(demo_images, tmp_path) -> list[Path]:
    folder = tmp_path / "shards"
    samples = [(k, {"jpg": b}) for k, b in demo_images[:12]]
    samples.insert(5, ("broken", {"jpg": b"\xff\xd8\xff\xe0 truncated"}))
    return [write_shard(folder, samples[i : i + 5], f"{i // 5:05d}.tar") for i in range(0, 15, 5)][:3]


def counting(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Count detect_shard calls; raise on call fail_after + 1, as a killed run stops."""
    calls: list[str] = []
    real = det.detect_shard

    def wrapped(path, *args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt("killed")
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(det, "detect_shard", wrapped)
    return calls


def test_a_killed_run_resumes_with_only_the_missing_shards(model, three_shards, tmp_path, monkeypatch):
    out, scratch = tmp_path / "out" / "regions.parquet", tmp_path / "scratch"
    calls = counting(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        det.detect(three_shards, out, scratch, model, ALL, 2, False)
    assert calls == ["00000.tar", "00001.tar"]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    (run,) = scratch.iterdir()
    assert len(list(run.glob("*.parquet"))) == 2

    monkeypatch.undo()
    calls = counting(monkeypatch)
    metrics = det.detect(three_shards, out, scratch, model, ALL, 2, False)
    assert calls == ["00002.tar"]
    assert metrics == {
        "shards": 3,
        "images": 13,
        "images_without_detections": 0,
        "regions": metrics["regions"],
        "rejects": 1,
        "rejects_by_reason": {"truncated": 1},
    }
    assert metrics["regions"] >= 12

    # The same bytes as a run that was never interrupted.
    monkeypatch.undo()
    fresh = tmp_path / "fresh.parquet"
    det.detect(three_shards, fresh, tmp_path / "scratch2", model, ALL, 1, False)
    assert fresh.read_bytes() == out.read_bytes()

    # A finished run re-run does nothing; a changed shard is the only one redone.
    calls = counting(monkeypatch)
    det.detect(three_shards, out, scratch, model, ALL, 2, False)
    assert calls == []
    shutil.copy(three_shards[0], three_shards[1])
    det.detect(three_shards, out, scratch, model, ALL, 2, False)
    assert calls == ["00001.tar"]
    assert len(list(run.glob("*.parquet"))) == 3  # the stale part is gone


def test_other_settings_are_another_run_and_its_parts_replace_the_old(
    model, three_shards, tmp_path, monkeypatch
):
    scratch = tmp_path / "scratch"
    det.detect(three_shards, tmp_path / "a.parquet", scratch, model, ALL, 2, False)
    (first,) = scratch.iterdir()
    calls = counting(monkeypatch)
    strict = Settings(**{**ALL.__dict__, "conf": 0.6})
    det.detect(three_shards, tmp_path / "b.parquet", scratch, model, strict, 2, False)
    assert len(calls) == 3
    (second,) = scratch.iterdir()
    assert second != first
    assert det.run_key(model, strict) != det.run_key(model, ALL) == first.name


def test_random_weights_are_the_same_every_load():
    a = yolo.load("yolov8n.yaml", "none", 64, "cpu")
    b = yolo.load("yolov8n.yaml", "none", 64, "cpu")
    assert a.digest == b.digest
    batch = np.full((2, 64, 64, 3), 114, np.uint8)
    assert np.array_equal(a.forward(batch).numpy(), b.forward(batch).numpy())
    assert not a.half and a.device.type == "cpu"


# --- params -------------------------------------------------------------------------------------


def raw_params(**detect) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["detect"].update(detect)
    return raw


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"imgsz": 100}, "detect.imgsz: must be a multiple of 32, the YOLO stride (value 100)"),
        ({"imgsz": "640"}, "detect.imgsz: Input should be a valid integer (value '640')"),
        ({"conf": 1.5}, "detect.conf: Input should be less than or equal to 1 (value 1.5)"),
        ({"iou": -0.1}, "detect.iou: Input should be greater than or equal to 0 (value -0.1)"),
        ({"max_regions": 0}, "detect.max_regions: Input should be greater than 0 (value 0)"),
        ({"min_area_fraction": 1.0}, "detect.min_area_fraction: Input should be less than 1 (value 1.0)"),
        (
            {"classes": []},
            "detect.classes: must be a non-empty list of class ids or names, or null for every class",
        ),
        (
            {"classes": [True]},
            "detect.classes: entry True is neither a class id (an integer >= 0) nor a class name",
        ),
        ({"classes": [-1]}, "detect.classes: entry -1 is neither a class id"),
        ({"classes": ["star", "star"]}, "detect.classes: lists a class twice"),
        ({"device": "cpu"}, "detect.device: unknown key (value 'cpu')"),  # runtime.device
        ({"out": ""}, "detect.out: must be a non-empty path (value '')"),
        ({"colour": "red"}, "detect.colour: unknown key (value 'red')"),
    ],
)
def test_bad_detect_params_are_named(change, expected):
    with pytest.raises(ParamsError) as err:
        parse_params(raw_params(**change), source="params.yaml", base_dir=REPO)
    assert expected in str(err.value)


def test_default_detect_params():
    p = parse_params(raw_params(), base_dir=REPO).detect
    assert (p.imgsz, p.classes, p.out) == (160, None, "data/regions.parquet")
    q = parse_params(raw_params(classes=["star", 0]), base_dir=REPO).detect
    assert q.classes == ["star", 0]


# --- the stage ----------------------------------------------------------------------------------


def stage_repo(tmp_path: Path, demo_images, **detect) -> Path:
    raw = raw_params(out="data/regions.parquet", **detect)
    raw["runtime"]["scratch"] = "scratch"
    raw["detector"]["weights"] = str(WEIGHTS)
    raw["detector"]["checkpoint"] = str(WEIGHTS)  # what the weights stage would have written
    raw["clip"]["pretrained"] = str(REPO / raw["clip"]["pretrained"])
    raw["curate"]["out"] = "curated"
    write_shard(tmp_path / "curated" / "train", [(k, {"jpg": b}) for k, b in demo_images[:4]])
    rows = [{"key": k, "shard": "train/00000.tar"} for k, _ in demo_images[:4]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "curated" / "train.parquet")  # curate's manifest
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def test_stage_writes_regions_and_metrics(demo_images, tmp_path):
    from stages import detect as stage

    params = stage_repo(tmp_path, demo_images)
    metrics = stage.run(params, progress=False)
    assert json.loads((tmp_path / "metrics" / "info" / "detect.json").read_text()) == metrics
    assert metrics["images"] == 4 and metrics["regions"] > 0
    assert pq.read_table(tmp_path / "data" / "regions.parquet").num_rows == 4


def test_stage_refuses_unknown_classes_and_missing_shards(demo_images, tmp_path):
    from typer.testing import CliRunner

    from stages import detect as stage
    from stages.cli import app

    params = stage_repo(tmp_path, demo_images, classes=["unicorn"])
    with pytest.raises(ParamsError, match=r"detect.classes: unknown class\(es\) \['unicorn'\]"):
        stage.run(params, progress=False)
    shutil.rmtree(tmp_path / "curated")
    result = CliRunner().invoke(app, ["detect", "--params", str(params)])
    assert result.exit_code == 3  # the pipeline's state, not the params, is at fault
    assert (
        result.output.startswith("error: ")
        and "curated/train does not exist; run the curate stage first" in result.output
    )


@pytest.mark.parametrize("cut", ["boundary", "mid-member"])
def test_a_shard_cut_short_is_one_error_line_not_fewer_rows(demo_images, tmp_path, cut):
    # Before: a cut at a member boundary gave exit 0 and fewer rows; a cut mid-member a traceback.
    from typer.testing import CliRunner

    from stages.cli import app

    params = stage_repo(tmp_path, demo_images)
    shard = tmp_path / "curated" / "train" / "00000.tar"
    starts = sample_starts(shard)
    end = starts[3] if cut == "boundary" else starts[3] + 700
    shard.write_bytes(shard.read_bytes()[:end])
    result = CliRunner().invoke(app, ["detect", "--params", str(params)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {shard}: truncated")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "regions.parquet").exists()


def test_a_whole_shard_short_of_its_manifest_is_named(demo_images, tmp_path):
    from stages import detect as stage

    params = stage_repo(tmp_path, demo_images)
    write_shard(tmp_path / "curated" / "train", [(k, {"jpg": b}) for k, b in demo_images[:3]])
    with pytest.raises(InputError, match=r"00000.tar: holds 3 sample\(s\), .*train.parquet lists 4$"):
        stage.run(params, progress=False)

"""pipeline.curate: the data mix, the leakage guard, bad input, determinism — on the tiny demo world
and on hand-written fixtures in the real formats."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.backend import Backend
from pipeline.captions import check_captions, clean_caption, clip_token_counter
from pipeline.config import Curate, ParamsError
from pipeline.config import settings as build_settings
from pipeline.curate import (
    CHUNK,
    EXCLUDED_REASONS,
    Decoder,
    Settings,
    SourcePaths,
    curate,
    key_stem,
    pick_caption,
    rank,
)
from pipeline.images import decode
from pipeline.shards import read_shard
from pipeline.sources import SourceError, read_karpathy

CAPTION_REASONS = {"caption_missing", "caption_empty", "caption_too_long"}
PRE_TRY = {"heldout_id", "heldout_filename", "failed_to_download", "no_image"}


def paths_for(world: Path) -> SourcePaths:
    return SourcePaths(
        coco_images=world / "coco",
        coco_train_annotations=world / "coco" / "annotations" / "captions_train2017.json",
        coco_karpathy=world / "karpathy" / "dataset_coco.json",
        flickr30k_images=world / "flickr30k" / "flickr30k-images",
        flickr30k_karpathy=world / "karpathy" / "dataset_flickr30k.json",
        cc_shards=world / "cc",
        imagenet_val=world / "imagenet" / "val",
        cifar10=world / "cifar-10-batches-py",
        cifar100=world / "cifar-100-python",
        sugarcrepe_annotations=world / "sugarcrepe",
        sugarcrepe_images=world / "sugarcrepe" / "images",
    )


def run_curate(
    cfg: Curate,
    paths: SourcePaths,
    out: Path,
    count,
    max_tokens: int,
    progress: bool = False,
    workers: int = 1,
):
    """The library's curate with the settings its stage builds from a `curate` section."""
    step = build_settings(Settings, cfg, mix=cfg.mix.model_dump(), max_tokens=max_tokens)
    return curate(step, paths, out, count, workers, progress)


def settings(coco: int, flickr30k: int, cc: int, **kw) -> Curate:
    # One caption per image unless a test asks for all (the demo's params.yaml pairs every caption).
    raw = {
        "mix": {"coco": coco, "flickr30k": flickr30k, "cc": cc},
        "captions_per_image": 1,
        "shard_size": 8,
        **kw,
    }
    return Curate.model_validate(raw)


@pytest.fixture(scope="session")
def tokens():
    """The demo CLIP's own tokenizer (context 32)."""
    return clip_token_counter("DCLIP-Demo-RN64")


def run(world: Path, out: Path, cfg: Curate, tokens, max_tokens: int | None = None, workers: int = 1) -> dict:
    count, context = tokens
    return run_curate(cfg, paths_for(world), out, count, max_tokens or context, workers=workers)


def rejects(out: Path) -> list[dict]:
    return pq.read_table(out / "rejects.parquet").to_pylist()


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "train.parquet").to_pylist()


def samples(folder: Path) -> dict[str, dict[str, bytes]]:
    return {k: s for shard in sorted(folder.glob("*.tar")) for k, s in read_shard(shard)}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the tiny world, every candidate tried ----------------------------------------------------


@pytest.fixture(scope="module")
def everything(tiny_world, tmp_path_factory, tokens):
    """Mix larger than every source: each candidate is tried, so each planted overlap is met."""
    out = tmp_path_factory.mktemp("curate") / "curated"
    metrics = run(tiny_world, out, settings(1000, 1000, 1000), tokens, workers=2)
    return out, metrics


def test_every_planted_overlap_is_caught(tiny_world, everything):
    out, metrics = everything
    planted = json.loads((tiny_world / "world.json").read_text())["planted_duplicates"]
    assert planted, "the tiny world plants overlaps"
    refused = {(r["source"], r["id"]): r for r in rejects(out)}
    kept = {(m["source"], m["id"]) for m in manifest(out)}
    for p in planted:
        copy = p["copy"]
        if copy.startswith("flickr30k/"):
            where = ("flickr30k", copy.rsplit("/", 1)[1])
        else:
            assert copy.startswith("cc/")
            where = ("cc", copy.split(":", 1)[1])
        assert where not in kept
        assert refused[where]["reason"] == "heldout_hash", where
        assert "test" in refused[where]["detail"]
    caught = sum(m["excluded"].get("heldout_hash", 0) for s, m in metrics["train"].items() if s != "total")
    assert caught == len(planted)


def test_no_karpathy_val_or_test_image_reaches_training(tiny_world, everything):
    out, metrics = everything
    coco_held = {
        str(im.cocoid)
        for im in read_karpathy(tiny_world / "karpathy" / "dataset_coco.json")
        if im.split in ("val", "test")
    }
    flickr_held = {
        im.filename
        for im in read_karpathy(tiny_world / "karpathy" / "dataset_flickr30k.json")
        if im.split in ("val", "test")
    }
    rows = manifest(out)
    assert not {r["id"] for r in rows if r["source"] == "coco"} & coco_held
    assert not {r["id"] for r in rows if r["source"] == "flickr30k"} & flickr_held
    # train2017 holds Karpathy test images, as real COCO does: they were excluded by id.
    train2017 = json.loads((tiny_world / "coco" / "annotations" / "captions_train2017.json").read_text())
    in_train2017 = {str(im["id"]) for im in train2017["images"]} & coco_held
    assert in_train2017 and metrics["train"]["coco"]["excluded"]["heldout_id"] == len(in_train2017)
    assert metrics["train"]["flickr30k"]["excluded"]["heldout_filename"] == len(flickr_held)


def test_counts_add_up_per_source(tiny_world, everything):
    out, metrics = everything
    world = json.loads((tiny_world / "world.json").read_text())
    by_source = Counter(r["source"] for r in manifest(out))
    for source in ("coco", "flickr30k", "cc"):
        m = metrics["train"][source]
        assert m["kept_pairs"] == m["kept_images"] == by_source[source]
        assert m["shortfall"] == m["asked"] - m["kept_pairs"] > 0
        refused = {**m["excluded"], **m["rejected"]}
        image_level = sum(n for r, n in refused.items() if r not in CAPTION_REASONS | PRE_TRY)
        assert m["tried"] == m["kept_images"] + image_level
        assert m["candidates"] == m["tried"] + sum(n for r, n in refused.items() if r in PRE_TRY)
    cc = metrics["train"]["cc"]
    assert cc["candidates"] == world["cc"]["samples"]
    assert cc["rejected"]["failed_to_download"] == world["cc"]["failed_to_download"]
    assert cc["rejected"]["truncated"] == world["cc"]["corrupt"]
    assert metrics["train"]["coco"]["candidates"] == world["coco"]["train2017"]
    assert metrics["train"]["total"]["pairs"] == sum(by_source.values())


def test_outputs_are_consistent_webdataset_and_parquet(tiny_world, everything):
    out, metrics = everything
    rows = manifest(out)
    assert len({r["key"] for r in rows}) == len(rows)
    train = samples(out / "train")
    assert set(train) == {r["key"] for r in rows}
    for r in rows:
        s = train[r["key"]]
        assert (out / r["shard"]).is_file() and set(s) == {"jpg", "txt", "json"}
        meta = json.loads(s["json"])
        assert s["txt"].decode() == r["caption"] == meta["caption"]
        assert (meta["source"], meta["id"], meta["width"], meta["height"]) == (
            r["source"],
            r["id"],
            r["width"],
            r["height"],
        )
        assert min(meta["width"], meta["height"]) <= 160 and decode(s["jpg"]).size == (
            r["width"],
            r["height"],
        )
        assert r["key"] == f"{r['image']}-{r['caption_index']}"
    # Shards mix the sources (a seeded shuffle), not one source after another.
    first = [r["source"] for r in rows if r["shard"] == "train/00000.tar"]
    assert len(set(first)) > 1
    # Val and test sets: every caption of every Karpathy val (test) image.
    world = json.loads((tiny_world / "world.json").read_text())
    for split, name, n in (
        ("test", "coco", world["coco"]["karpathy"]["test"]),
        ("test", "flickr30k", world["flickr30k"]["test"]),
        ("val", "coco", world["coco"]["karpathy"]["val"]),
        ("val", "flickr30k", world["flickr30k"]["val"]),
    ):
        test = pq.read_table(out / "eval" / name / f"{split}.parquet").to_pylist()
        assert len(test) == n == metrics[split][name]["images"] > 0
        assert all(len(t["captions"]) == 5 and t["shard"].startswith(f"eval/{name}/{split}/") for t in test)
        shard = samples(out / "eval" / name / split)
        assert set(shard) == {t["key"] for t in test}
        assert json.loads(shard[test[0]["key"]]["json"])["captions"] == test[0]["captions"]
        assert shard[test[0]["key"]]["txt"].decode().split("\n") == test[0]["captions"]
    # The val and test sets share no image.
    for name in ("coco", "flickr30k"):
        ids = [
            {t["id"] for t in pq.read_table(out / "eval" / name / f"{s}.parquet").to_pylist()}
            for s in ("val", "test")
        ]
        assert not ids[0] & ids[1]
    # Zero-shot sets, with class names and a label per sample.
    for name, classes in (("imagenet", 100), ("cifar10", 10), ("cifar100", 100)):
        names = (out / "eval" / name / "classnames.txt").read_text().splitlines()
        table = pq.read_table(out / "eval" / name / "test.parquet").to_pylist()
        assert len(names) == classes == metrics["zeroshot"][name]["classes"]
        assert len(table) == metrics["zeroshot"][name]["images"] > 0
        s = samples(out / "eval" / name / "test")[table[0]["key"]]
        assert int(s["cls"]) == table[0]["label"] == json.loads(s["json"])["label"]
    cifar = samples(out / "eval" / "cifar10" / "test")
    assert all(decode(s["png"]).size == (32, 32) for s in cifar.values())
    # Nothing else is left in the output: no spill file, no temporary names.
    assert not [p for p in out.rglob(".*")]
    assert not out.with_name(out.name + ".partial").exists()


# --- the data mix -------------------------------------------------------------------------------


def test_exact_counts_and_byte_identical_outputs_whatever_the_workers(tiny_world, tmp_path, tokens):
    a = run(tiny_world, tmp_path / "a", settings(7, 4, 5), tokens, workers=1)
    b = run(tiny_world, tmp_path / "b", settings(7, 4, 5), tokens, workers=2)
    assert a == b
    assert {s: a["train"][s]["kept_pairs"] for s in ("coco", "flickr30k", "cc")} == {
        "coco": 7,
        "flickr30k": 4,
        "cc": 5,
    }
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    # Selection follows the seeded rank: nothing refused, so the 7 best-ranked candidates are kept.
    rows = manifest(tmp_path / "a")
    held = {
        str(im.cocoid)
        for im in read_karpathy(tiny_world / "karpathy" / "dataset_coco.json")
        if im.split in ("val", "test")
    }
    train2017 = json.loads((tiny_world / "coco" / "annotations" / "captions_train2017.json").read_text())
    candidates = sorted(
        {str(im["id"]) for im in train2017["images"]} - held, key=lambda i: rank(0, "coco", i)
    )
    refused = [
        r for r in rejects(tmp_path / "a") if r["source"] == "coco" and r["reason"] not in EXCLUDED_REASONS
    ]
    assert not refused
    assert {r["id"] for r in rows if r["source"] == "coco"} == set(candidates[:7])
    # A new seed draws a different sample.
    c = run(tiny_world, tmp_path / "c", settings(7, 4, 5, seed=1), tokens)
    assert c["train"]["coco"]["kept_pairs"] == 7
    assert {r["id"] for r in manifest(tmp_path / "c")} != {r["id"] for r in rows}


def test_captions_per_image_one_draws_one_caption_per_image(tiny_world, tmp_path, tokens):
    run(tiny_world, tmp_path / "one", settings(12, 0, 0), tokens)
    rows = manifest(tmp_path / "one")
    assert len(rows) == len({r["image"] for r in rows}) == 12
    for r in rows:
        assert r["caption_index"] == pick_caption(0, "coco", r["id"], 5)


def test_captions_per_image_all_pairs_every_caption_up_to_the_count(tiny_world, tmp_path, tokens):
    metrics = run(tiny_world, tmp_path / "all", settings(12, 0, 0, captions_per_image="all"), tokens)
    rows = manifest(tmp_path / "all")
    per_image = Counter(r["image"] for r in rows)
    assert len(rows) == 12 and sorted(per_image.values()) == [2, 5, 5]
    assert metrics["train"]["coco"]["kept_images"] == 3
    last = next(img for img, n in per_image.items() if n == 2)
    assert sorted(r["caption_index"] for r in rows if r["image"] == last) == [0, 1]
    # The pairs of one image carry the same picture.
    by_key = samples(tmp_path / "all" / "train")
    first = next(img for img, n in per_image.items() if n == 5)
    assert len({by_key[f"{first}-{i}"]["jpg"] for i in range(5)}) == 1


# --- bad input: a hand-written COCO overlay on the tiny world ----------------------------------------


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _picture(seed: int, w: int = 60, h: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


GOOD = ["A red circle.", "A blue square.", "Two shapes.", "A green star.", "Shapes on grey."]
LONG = " ".join(["a very long caption about red circles"] * 10)


@pytest.fixture(scope="module")
def bad_world(tiny_world, tmp_path_factory):
    """The tiny world plus COCO train images and captions of every awkward kind. Returns
    (world folder, {name: COCO id})."""
    world = tmp_path_factory.mktemp("bad") / "raw"
    shutil.copytree(tiny_world, world)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    flickr_val = next(
        im for im in read_karpathy(world / "karpathy" / "dataset_flickr30k.json") if im.split == "val"
    )
    flickr_val_pixels = decode((world / "flickr30k" / "flickr30k-images" / flickr_val.filename).read_bytes())
    twin = _jpeg(_picture(9))
    files = {
        "truncated": _jpeg(_picture(1))[:300],
        "png_named_jpg": _png(_picture(2)),
        "cmyk": _jpeg(_picture(3).convert("CMYK")),
        "greyscale": _jpeg(_picture(4).convert("L")),
        "sixteen_bit": _png(Image.fromarray(np.arange(2400, dtype=np.uint16).reshape(40, 60) * 27)),
        "palette": _png(_picture(5).convert("P")),
        "exif_rotated": _jpeg(_picture(6), exif=exif),
        "zero_bytes": b"",
        "missing": None,
        "flickr_val_copy": _png(flickr_val_pixels),  # same pixels, other bytes, other format
        "twin_a": twin,
        "twin_b": twin,
        "no_caption": _jpeg(_picture(10)),
        "long_caption": _jpeg(_picture(11)),
        "non_ascii": _jpeg(_picture(12)),
        "control_chars": _jpeg(_picture(13)),
    }
    captions = {
        "no_caption": ["", "   \t "],
        "long_caption": [LONG, "A fine caption."],
        "non_ascii": ["Un cafe\u0301 à Paris — 東京の夜景 🌃"],
        "control_chars": ["A\x00 red\u200b\tcircle\n\n on\u00a0 grey "],
    }
    ann_path = world / "coco" / "annotations" / "captions_train2017.json"
    doc = json.loads(ann_path.read_text())
    ids, ann_id = {}, 10_000_000
    for n, (name, data) in enumerate(files.items()):
        cocoid = 900_001 + n
        ids[name] = str(cocoid)
        file_name = f"{cocoid:012d}.jpg"
        if data is not None:
            (world / "coco" / "train2017" / file_name).write_bytes(data)
        doc["images"].append({"id": cocoid, "file_name": file_name, "width": 60, "height": 40})
        for text in captions.get(name, GOOD):
            doc["annotations"].append({"image_id": cocoid, "id": ann_id, "caption": text})
            ann_id += 1
    ann_path.write_text(json.dumps(doc))
    return world, ids, flickr_val.filename


@pytest.fixture(scope="module")
def bad_out(bad_world, tmp_path_factory, tokens):
    world, _, _ = bad_world
    out = tmp_path_factory.mktemp("bad-out") / "curated"
    metrics = run(
        world, out, settings(1000, 0, 0, captions_per_image="all"), tokens, max_tokens=32, workers=2
    )
    return out, metrics


def test_each_bad_image_is_kept_correctly_or_refused_with_its_reason(bad_world, bad_out):
    world, ids, flickr_val = bad_world
    out, metrics = bad_out
    refused = {}
    for r in rejects(out):
        if r["source"] == "coco":
            refused.setdefault(r["id"], []).append(r["reason"])
    kept = {r["id"]: r for r in manifest(out) if r["source"] == "coco"}
    assert refused[ids["truncated"]] == ["truncated"]
    assert refused[ids["zero_bytes"]] == ["empty_file"]
    assert refused[ids["missing"]] == ["missing_file"]
    assert refused[ids["flickr_val_copy"]] == ["heldout_hash"]  # the hand-written overlap
    assert any(flickr_val in r["detail"] for r in rejects(out) if r["id"] == ids["flickr_val_copy"])
    twins = [ids["twin_a"] in kept, ids["twin_b"] in kept]
    assert sorted(twins) == [False, True]
    loser = ids["twin_b"] if twins[0] else ids["twin_a"]
    assert refused[loser] == ["duplicate"]
    train = samples(out / "train")
    for name in ("png_named_jpg", "cmyk", "greyscale", "sixteen_bit", "palette", "exif_rotated"):
        assert ids[name] in kept, name
        img = decode(train[kept[ids[name]]["key"]]["jpg"])
        assert img.mode == "RGB"
    # EXIF orientation applied: stored 60×40 sideways, shown 40×60.
    assert (kept[ids["exif_rotated"]]["width"], kept[ids["exif_rotated"]]["height"]) == (40, 60)
    meta = json.loads(train[kept[ids["exif_rotated"]]["key"]]["json"])
    assert (meta["original_width"], meta["original_height"]) == (40, 60)
    # 16-bit greyscale is scaled, not clipped to white.
    grey = np.asarray(decode(train[kept[ids["sixteen_bit"]]["key"]]["jpg"]))
    assert grey.mean() < 200
    assert metrics["train"]["coco"]["rejected"]["truncated"] == 1


def test_each_bad_caption_is_cleaned_or_refused(bad_world, bad_out):
    world, ids, _ = bad_world
    out, _ = bad_out
    rows = manifest(out)
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    refused = [r for r in rejects(out) if r["source"] == "coco"]
    no_caption = sorted(r["reason"] for r in refused if r["id"] == ids["no_caption"])
    assert no_caption == ["caption_empty", "caption_empty", "no_valid_caption"]
    assert ids["no_caption"] not in by_id
    long = [r for r in refused if r["id"] == ids["long_caption"]]
    assert [r["reason"] for r in long] == ["caption_too_long"] and "caption 0" in long[0]["detail"]
    assert [(r["caption_index"], r["caption"]) for r in by_id[ids["long_caption"]]] == [
        (1, "A fine caption.")
    ]
    assert by_id[ids["non_ascii"]][0]["caption"] == "Un café à Paris — 東京の夜景 🌃"
    assert by_id[ids["control_chars"]][0]["caption"] == "A red circle on grey"
    train = samples(out / "train")
    assert train[by_id[ids["non_ascii"]][0]["key"]]["txt"].decode() == "Un café à Paris — 東京の夜景 🌃"


def test_a_malformed_annotation_file_names_the_file_and_key(tiny_world, tmp_path, tokens):
    world = tmp_path / "raw"
    shutil.copytree(tiny_world, world)
    out = tmp_path / "curated"
    run(world, out, settings(3, 0, 0), tokens)
    before = tree(out)
    ann = world / "coco" / "annotations" / "captions_train2017.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][3]["caption"] = 17
    ann.write_text(json.dumps(doc))
    with pytest.raises(
        SourceError, match=r"captions_train2017\.json: annotations\[3\]\.caption: expected a string, got int"
    ):
        run(world, out, settings(3, 0, 0), tokens)
    # The earlier output is untouched; no half output is left beside it.
    assert tree(out) == before
    assert not (tmp_path / "curated.partial").exists()
    karpathy = world / "karpathy" / "dataset_coco.json"
    doc = json.loads(karpathy.read_text())
    del doc["images"][2]["cocoid"]
    karpathy.write_text(json.dumps(doc))
    with pytest.raises(SourceError, match=r"dataset_coco\.json: images\[2\]\.cocoid: missing"):
        run(world, tmp_path / "other", settings(3, 0, 0), tokens)
    doc["images"][2]["split"] = "testing"
    karpathy.write_text(json.dumps(doc))
    with pytest.raises(SourceError, match=r"dataset_coco\.json: images\[2\]\.split: unknown split 'testing'"):
        run(world, tmp_path / "other", settings(3, 0, 0), tokens)


def test_the_stage_names_each_missing_raw_input(tmp_path):
    from stages.curate import run as stage_run

    (tmp_path / "params.yaml").write_text("sources:\n  cc:\n    shards: demo/raw/nowhere/cc\n")
    with pytest.raises(ParamsError) as err:
        stage_run(tmp_path / "params.yaml", progress=False)
    assert "sources.cc.shards: " in str(err.value) and "demo/raw/nowhere/cc does not exist" in str(err.value)
    assert "sources.karpathy.coco: " in str(err.value)


def test_the_stage_refuses_a_caption_limit_beyond_the_models_context(tiny_world, tmp_path, tokens):
    import yaml

    from stages.curate import run as stage_run

    p = paths_for(tiny_world)
    sources = {
        "root": str(tiny_world),
        "coco": {
            "images": str(p.coco_images),
            "train_annotations": str(p.coco_train_annotations),
        },
        "flickr30k": {"images": str(p.flickr30k_images)},
        "karpathy": {"folder": str(p.coco_karpathy.parent)},
        "cc": {"shards": str(p.cc_shards)},
        "imagenet": {"val": str(p.imagenet_val)},
        "cifar10": {"folder": str(p.cifar10)},
        "cifar100": {"folder": str(p.cifar100)},
        "sugarcrepe": {"annotations": str(p.sugarcrepe_annotations), "images": str(p.sugarcrepe_images)},
    }
    raw = {
        "clip": {"model": "DCLIP-Demo-RN64"},
        "sources": sources,
        "curate": {"caption": {"max_tokens": 40}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ParamsError,
        match=r"curate.caption.max_tokens: 40 exceeds the context length of clip.model 'DCLIP-Demo-RN64' \(32\)",
    ):
        stage_run(tmp_path / "params.yaml", progress=False)
    assert not (tmp_path / "data").exists()


# --- the pieces --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  A red\tcircle \n", "A red circle"),
        ("A\x00B\x7f C", "AB C"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("non\u00a0breaking", "non breaking"),
        ("cafe\u0301", "café"),
        ("東京の夜景", "東京の夜景"),
        (" \t\n ", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_check_captions_with_the_real_clip_tokenizer(tokens):
    count, context = tokens
    assert context == 32 and count("a red circle") == 5  # start, 3 words, end
    check = check_captions([None, " ", "a red circle", LONG], count, context)
    assert check.kept == ((2, "a red circle"),)
    assert [(r.index, r.reason) for r in check.refused] == [
        (0, "caption_missing"),
        (1, "caption_empty"),
        (3, "caption_too_long"),
    ]


def test_rank_keys_and_caption_draws_are_fixed_by_seed_and_id():
    assert rank(0, "coco", "1") == rank(0, "coco", "1") != rank(1, "coco", "1") != rank(0, "cc", "1")
    assert {pick_caption(0, "coco", str(i), 5) for i in range(50)} == set(range(5))
    assert key_stem("1000092795.jpg") == "1000092795" and key_stem("000000012") == "000000012"
    odd = key_stem("my photo (1).jpg")
    assert odd.startswith("h") and odd == key_stem("my photo (1).jpg") != key_stem("my photo (2).jpg")


def test_decoder_keeps_order_and_reads_ahead_only_a_bounded_window():
    pulled = 0

    def jobs():
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield i, b"x" * (i % 7)

    with Decoder(Backend(threads=2)) as decoder:
        results = []
        for meta, n in decoder.map(len, jobs()):
            results.append((meta, n))
            if len(results) == 40:
                break
        assert results == [(i, i % 7) for i in range(40)]
        assert pulled <= 40 + 2 * 3 * CHUNK + CHUNK
    with Decoder(Backend(threads=1)) as decoder:
        assert list(decoder.map(len, ((i, b"ab") for i in range(5)))) == [(i, 2) for i in range(5)]


# --- the test sets from CLIP_benchmark's files ------------------------------------------------------


def with_clip_benchmark(p: SourcePaths, coco_test: Path | None = None) -> SourcePaths:
    from dataclasses import replace

    folder = p.coco_karpathy.parent
    return replace(
        p,
        coco_test=coco_test or folder / "coco_test_karpathy.json",
        flickr30k_test=folder / "flickr30k_test_karpathy.txt",
    )


def test_clip_benchmark_files_give_the_same_test_sets_as_karpathys_json(
    tiny_world, everything, tmp_path, tokens
):
    out, metrics = everything
    count, context = tokens
    other = tmp_path / "curated"
    got = run_curate(
        settings(3, 3, 3), with_clip_benchmark(paths_for(tiny_world)), other, count, context, progress=False
    )
    assert got["test"]["coco"].pop("annotations") == "coco_test_karpathy.json"
    assert got["test"]["flickr30k"].pop("annotations") == "flickr30k_test_karpathy.txt"
    assert {k: {**v, "annotations": None} for k, v in got["test"].items()} == {
        k: {**v, "annotations": None} for k, v in metrics["test"].items()
    }
    # The same images, captions and bytes; only the order differs (CLIP_benchmark's COCO file
    # lists images by id).
    for name in ("coco", "flickr30k"):
        a, b = samples(out / "eval" / name / "test"), samples(other / "eval" / name / "test")
        assert a and a == b

        def by_key(root):
            return sorted((r["key"], r["id"], r["captions"]) for r in pq.read_table(root).to_pylist())

        assert by_key(out / "eval" / name / "test.parquet") == by_key(other / "eval" / name / "test.parquet")


def test_sources_switched_off_are_not_read_built_or_reported(tiny_world, tmp_path, tokens):
    """CC, ImageNet, CIFAR-100 and the probe off, COCO training off (its val and test stay): their
    inputs are not read (SourcePaths.resolve gives None for them: tests/test_config.py), and
    nothing is built or counted for them."""
    count, context = tokens
    paths = dataclasses.replace(
        paths_for(tiny_world),
        coco_train_annotations=None,
        cc_shards=None,
        imagenet_val=None,
        cifar100=None,
        sugarcrepe_annotations=None,
        sugarcrepe_images=None,
    )
    out = tmp_path / "curated"
    metrics = run_curate(settings(0, 6, 0), paths, out, count, context)
    built = json.loads((out / "eval" / "sets.json").read_text())
    assert built == {"coco": ["val", "test"], "flickr30k": ["val", "test"], "cifar10": ["test"]}
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["cifar10", "coco", "flickr30k", "sets.json"]
    assert set(metrics["train"]) == {"flickr30k", "total"} and metrics["train"]["total"]["pairs"] == 6
    assert set(metrics["zeroshot"]) == {"cifar10"} and metrics["probe"] == {}
    assert set(metrics["val"]) == set(metrics["test"]) == {"coco", "flickr30k"}
    assert {r["source"] for r in rejects(out)} <= {
        "flickr30k",
        "coco_val",
        "coco_test",
        "flickr30k_val",
        "flickr30k_test",
        "cifar10",
    }
    assert {r["source"] for r in manifest(out)} == {"flickr30k"}


def test_the_evaluation_sets_are_in_clip_benchmark_s_webdataset_layout(everything):
    """What CLIP_benchmark's `wds/` loader reads: <set>/<split>/nshards.txt and 0.tar … n-1.tar;
    dataset_type.txt "retrieval" beside a retrieval set; classnames.txt and the template file
    beside a zero-shot set (tests/test_evaluate.py runs the loader itself on them)."""
    out, metrics = everything
    eval_dir = out / "eval"
    built = json.loads((eval_dir / "sets.json").read_text())
    assert built == {
        "coco": ["val", "test"],
        "flickr30k": ["val", "test"],
        "imagenet": ["test"],
        "cifar10": ["test"],
        "cifar100": ["test"],
        "sugarcrepe": ["test"],
    }
    for name, splits in built.items():
        for split in splits:
            n = int((eval_dir / name / split / "nshards.txt").read_text())
            assert sorted(p.name for p in (eval_dir / name / split).iterdir()) == sorted(
                ["nshards.txt", *(f"{i}.tar" for i in range(n))]
            )
            rows = pq.read_table(eval_dir / name / f"{split}.parquet").to_pylist()
            assert {r["shard"] for r in rows} == {f"eval/{name}/{split}/{i}.tar" for i in range(n)}
    for name in ("coco", "flickr30k"):
        assert (eval_dir / name / "dataset_type.txt").read_text() == "retrieval\n"
    for name in ("imagenet", "cifar10", "cifar100"):
        assert not (eval_dir / name / "dataset_type.txt").exists()  # CLIP_benchmark: classification
        classnames = (eval_dir / name / "classnames.txt").read_text().splitlines()
        assert len(classnames) == metrics["zeroshot"][name]["classes"]
        template = (eval_dir / name / "zeroshot_classification_templates.txt").read_text()
        assert template == "This is a photo of a {c}\n"


def test_an_image_only_clip_benchmarks_file_calls_test_is_held_out_of_training(tiny_world, tmp_path, tokens):
    doc = json.loads((tiny_world / "karpathy" / "coco_test_karpathy.json").read_text())
    karpathy_train = [
        im
        for im in read_karpathy(tiny_world / "karpathy" / "dataset_coco.json")
        if im.split in ("train", "restval")
    ]
    extra = karpathy_train[0]
    doc["images"].append({"id": extra.cocoid, "file_name": extra.filename, "width": 1, "height": 1})
    doc["annotations"].append({"image_id": extra.cocoid, "id": 10**6, "caption": "An extra test image."})
    edited = tmp_path / "coco_test_karpathy.json"
    edited.write_text(json.dumps(doc))
    count, context = tokens
    paths = with_clip_benchmark(paths_for(tiny_world), coco_test=edited)
    out = tmp_path / "curated"
    metrics = run_curate(settings(1000, 0, 0), paths, out, count, context, progress=False)
    assert str(extra.cocoid) not in {r["id"] for r in manifest(out)}
    refused = {(r["source"], r["id"]): r for r in rejects(out)}
    assert refused[("coco", str(extra.cocoid))]["reason"] == "heldout_id"
    test_ids = [r["id"] for r in pq.read_table(out / "eval" / "coco" / "test.parquet").to_pylist()]
    assert str(extra.cocoid) in test_ids and len(test_ids) == len(doc["images"])
    assert metrics["test"]["coco"]["listed"] == len(doc["images"])


def test_a_coco_test_file_name_without_an_id_is_named(tiny_world, tmp_path, tokens):
    doc = json.loads((tiny_world / "karpathy" / "coco_test_karpathy.json").read_text())
    doc["images"][1]["file_name"] = "COCO_val2014_unknown.png"
    edited = tmp_path / "coco_test_karpathy.json"
    edited.write_text(json.dumps(doc))
    count, context = tokens
    with pytest.raises(SourceError, match=r"coco_test_karpathy\.json: images\[1\]\.file_name: no COCO id"):
        run_curate(
            settings(1, 0, 0),
            with_clip_benchmark(paths_for(tiny_world), edited),
            tmp_path / "o",
            count,
            context,
        )


# --- the compositional probe ----------------------------------------------------------------------


def test_the_probe_images_come_in_once_each_with_every_item(tiny_world, everything):
    from pipeline.sources import read_sugarcrepe

    out, metrics = everything
    items = read_sugarcrepe(tiny_world / "sugarcrepe")
    rows = pq.read_table(out / "eval" / "sugarcrepe" / "test.parquet").to_pylist()
    assert [(r["category"], r["index"], r["caption"], r["negative_caption"]) for r in rows] == [
        (i.category, i.index, i.caption, i.negative_caption) for i in items
    ]
    images = samples(out / "eval" / "sugarcrepe" / "test")
    assert set(images) == {r["key"] for r in rows}
    assert len(images) == len({i.filename for i in items}) == metrics["probe"]["sugarcrepe"]["images"]
    by_name = {json.loads(s["json"])["id"]: k for k, s in images.items()}
    assert all(by_name[i.filename] == r["key"] for i, r in zip(items, rows))
    assert metrics["probe"]["sugarcrepe"]["items"] == dict(Counter(i.category for i in items))


def test_a_missing_probe_image_drops_its_items_and_is_recorded(tiny_world, tmp_path, tokens):
    from dataclasses import replace

    from pipeline.sources import read_sugarcrepe

    images = tmp_path / "images"
    shutil.copytree(tiny_world / "sugarcrepe" / "images", images)
    items = read_sugarcrepe(tiny_world / "sugarcrepe")
    gone = items[0].filename
    (images / gone).unlink()
    count, context = tokens
    out = tmp_path / "curated"
    metrics = run_curate(
        settings(1, 0, 0),
        replace(paths_for(tiny_world), sugarcrepe_images=images),
        out,
        count,
        context,
        progress=False,
    )
    probe = metrics["probe"]["sugarcrepe"]
    assert probe["items_dropped"] == sum(i.filename == gone for i in items) >= 1
    assert probe["rejected"] == {"missing_file": 1}
    assert {(r["source"], r["id"], r["reason"]) for r in rejects(out)} >= {
        ("sugarcrepe", gone, "missing_file")
    }


# --- partial and failed downloads of Conceptual Captions ------------------------------------------


def cc_world(tiny_world: Path, tmp_path: Path) -> Path:
    world = tmp_path / "raw"
    shutil.copytree(tiny_world, world)
    return world


def test_a_partly_downloaded_cc_shard_is_read_as_far_as_it_goes(tiny_world, tmp_path, tokens):
    # Before: the first unreadable byte of one shard stopped the whole curate run.
    import tarfile

    world = cc_world(tiny_world, tmp_path)
    shard = world / "cc" / "00001.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # A download killed 100 bytes into the image of the shard's middle sample.
    jpgs = [m for m in members if m.name.endswith(".jpg")]
    at = jpgs[len(jpgs) // 2]
    shard.write_bytes(shard.read_bytes()[: at.offset_data + 100])
    order = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    read_whole = set(order[: order.index(at.name.split(".", 1)[0])])
    listed = {
        r["key"]
        for r in pq.read_table(world / "cc" / "00001.parquet").to_pylist()
        if r["status"] == "success"
    }
    metrics = run(world, tmp_path / "out", settings(0, 0, 40), tokens)
    refused = [r for r in rejects(tmp_path / "out") if r["reason"] == "shard_truncated"]
    assert sorted(r["id"] for r in refused) == sorted(listed - read_whole)
    assert all(
        r["source"] == "cc" and r["detail"].startswith("00001.tar: the shard is cut short") for r in refused
    )
    assert metrics["train"]["cc"]["rejected"]["shard_truncated"] == len(refused) > 0
    kept = {r["id"] for r in manifest(tmp_path / "out")}
    assert kept and not kept & {r["id"] for r in refused}


def test_a_cc_source_the_mix_asks_for_that_gives_nothing_is_an_error(tiny_world, tmp_path, tokens, capsys):
    # Before: exit 0 with zero CC pairs, the shortfall only inside the metrics.
    world = cc_world(tiny_world, tmp_path)
    for f in (world / "cc").iterdir():
        f.unlink()
    with pytest.raises(SourceError, match=r"cc: curate.mix.cc asks for 4 pairs but the source gave none"):
        run(world, tmp_path / "out", settings(2, 0, 4), tokens)
    assert not (tmp_path / "out").exists()
    metrics = run(world, tmp_path / "out", settings(2, 0, 4, allow_empty_source=True), tokens)
    assert metrics["train"]["cc"]["kept_pairs"] == 0 and metrics["train"]["coco"]["kept_pairs"] == 2
    assert "warning: " in capsys.readouterr().err


def test_a_failed_download_is_one_reject_and_one_candidate(tiny_world, tmp_path, tokens):
    # img2dataset keeps a failed key's .json in the tar as well as its parquet row. Before: two
    # reject rows (failed_to_download and no_image) and the key counted twice among candidates.
    import io
    import tarfile

    world = cc_world(tiny_world, tmp_path)
    failed = [
        r
        for r in pq.read_table(world / "cc" / "00000.parquet").to_pylist()
        if r["status"] == "failed_to_download"
    ]
    assert failed
    with tarfile.open(world / "cc" / "00000.tar", "a") as tar:
        for r in failed:
            data = json.dumps({"key": r["key"], "status": r["status"], "url": r["url"]}).encode()
            info = tarfile.TarInfo(f"{r['key']}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples_in_world = json.loads((world / "world.json").read_text())["cc"]["samples"]
    metrics = run(world, tmp_path / "out", settings(0, 0, 40), tokens)
    for r in failed:
        rows = [x for x in rejects(tmp_path / "out") if x["id"] == r["key"]]
        assert [x["reason"] for x in rows] == ["failed_to_download"]
    assert metrics["train"]["cc"]["candidates"] == samples_in_world
    assert "no_image" not in metrics["train"]["cc"]["rejected"]

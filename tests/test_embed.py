"""embed: cached embeddings equal open_clip's own, token embeddings, region weights from the
cache, zero-detection images, detect rejects, images with several captions, 512-D and 768-D
models, resume after a kill, byte-identical reruns, and params refused with their key named."""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

import pipeline.embed as emb
from pipeline import images
from pipeline.config import ParamsError, parse_params
from pipeline.curate import TRAIN_SCHEMA
from pipeline.detect import REGIONS_SCHEMA
from pipeline.errors import MissingOutput
from pipeline.models import clip
from pipeline.models.clip import encode_tokens
from pipeline.shards import ShardWriter, read_shard
from pipeline.tables import write_table

from .helpers import REPO

DEMO = "DCLIP-Demo-RN64"
DEMO_WEIGHTS = REPO / "demo" / "weights" / "clip-DCLIP-Demo-RN64.pt"
SETTINGS = emb.Settings(context_margin=0.0, weights="product", max_regions=None, batch_size=4)


@dataclass
class Item:
    """One training pair for a hand-made dataset and its detect row."""

    key: str
    caption: str
    size: tuple[int, int] = (120, 96)
    boxes: list[list[float]] = field(default_factory=list)
    conf: list[float] = field(default_factory=list)
    image: str | None = None  # the image's key; default: its own
    reject: bool = False  # no image member: detect records a reject


def picture(seed: str, size: tuple[int, int], boxes: list[list[float]]) -> bytes:
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for b in boxes:
        draw.rectangle([int(v) for v in b], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return images.encode_jpeg(img, 90)


def make_dataset(root: Path, items: list[Item], shard_size: int) -> tuple[list[Path], Path, Path]:
    """Curated shards, their manifest and a detect regions table written by hand."""
    train = root / "curated" / "train"
    pixels: dict[str, bytes] = {}
    manifest, rows = [], []
    with ShardWriter(train, max_count=shard_size) as writer:
        for it in items:
            image = it.image or it.key
            data = pixels.setdefault(image, picture(image, it.size, it.boxes))
            fields = {"txt": it.caption, "json": {"id": image}}
            if not it.reject:
                fields["jpg"] = data
            shard = writer.write(it.key, fields)
            w, h = it.size
            manifest.append(
                dict(key=it.key, shard=f"train/{shard}", source="coco", id=image, caption=it.caption,
                     image=image, caption_index=0, width=w, height=h)
            )  # fmt: skip
            boxes = [] if it.reject else it.boxes
            rows.append(
                dict(key=it.key, shard=shard, width=None if it.reject else w, height=None if it.reject else h,
                     regions=len(boxes), boxes=boxes, boxes_norm=[[b[0] / w, b[1] / h, b[2] / w, b[3] / h] for b in boxes],
                     confidences=[] if it.reject else it.conf, classes=[0] * len(boxes), class_names=["shape"] * len(boxes),
                     reject="no_image" if it.reject else None, reject_detail="no image member" if it.reject else None)
            )  # fmt: skip
    write_table(root / "curated" / "train.parquet", manifest, TRAIN_SCHEMA)
    write_table(root / "regions.parquet", rows, REGIONS_SCHEMA)
    return sorted(train.glob("*.tar")), root / "curated" / "train.parquet", root / "regions.parquet"


ITEMS = [
    Item(
        "p0", "a red square and a blue circle", (120, 96), [[10, 10, 50, 40], [60.5, 30, 110, 90]], [0.9, 0.6]
    ),
    Item("p1", "nothing to see", (100, 100)),  # no detection: only the whole image
    Item("p2", "a broken picture", reject=True),  # detect could not read it
    Item("p3", "a tall thin box", (90, 130), [[40, 5, 48, 125]], [0.3]),
    Item(
        "p4",
        "three small things",
        (128, 112),
        [[0, 0, 20, 20], [30, 30, 50, 60], [100, 90, 128, 112]],
        [0.5, 0.7, 0.4],
    ),
    Item("p5", "a green triangle", (96, 96), [[20, 20, 70, 80]], [0.8]),
]


@pytest.fixture(scope="module")
def demo_encoder() -> clip.Encoder:
    return clip.load_encoder(DEMO, str(DEMO_WEIGHTS), "cpu")


@pytest.fixture(scope="module")
def reference():
    net, _, preprocess = open_clip.create_model_and_transforms(DEMO, pretrained=str(DEMO_WEIGHTS))
    return net.eval(), preprocess, open_clip.get_tokenizer(DEMO)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), ITEMS, shard_size=4)


@pytest.fixture(scope="module")
def embedded(dataset, demo_encoder, tmp_path_factory) -> tuple[Path, dict]:
    shards, manifest, regions_table = dataset
    work = tmp_path_factory.mktemp("embed")
    metrics = emb.embed(
        shards, manifest, regions_table, work / "out", work / "scratch", demo_encoder, SETTINGS, 2, False
    )
    return work / "out", metrics


def table(out: Path, name: str) -> dict[str, list]:
    return pq.read_table(out / f"{name}.parquet").to_pydict()


def by_key(out: Path, name: str, key: str = "key") -> dict[str, dict]:
    return {r[key]: r for r in pq.read_table(out / f"{name}.parquet").to_pylist()}


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --- the cache equals open_clip's own encoders ----------------------------------------------------


def test_cached_region_embeddings_match_open_clip_encode_image(embedded, dataset, reference):
    out, _ = embedded
    net, preprocess, _ = reference
    samples = {k: s for shard in dataset[0] for k, s in read_shard(shard)}
    owner = {r["image"]: r["key"] for r in pq.read_table(out / "images.parquet").to_pylist()}
    rows = pq.read_table(out / "regions.parquet").to_pylist()
    assert len(rows) == 5 + 2 + 1 + 3 + 1  # the whole image of each of 5 images, and 7 boxes
    assert pq.read_schema(out / "regions.parquet").field("embedding").type == pa.list_(pa.float16(), 128)
    for r in rows:
        image = Image.open(io.BytesIO(samples[owner[r["image"]]]["jpg"])).convert("RGB")
        crop = image if r["region"] == 0 else image.crop(tuple(r["crop"]))
        with torch.no_grad():
            want = net.encode_image(preprocess(crop)[None])[0].numpy()
        assert cos(r["embedding"], want) >= 0.999, r
    whole = by_key(out, "images", "image")
    for r in rows:
        if r["region"] == 0:
            assert r["embedding"] == whole[r["image"]]["embedding"]
            assert r["box"] == [0, 0, whole[r["image"]]["width"], whole[r["image"]]["height"]]
            assert (r["confidence"], r["area"], r["class"], r["class_name"]) == (1.0, 1.0, -1, "image")


def test_crops_are_the_detect_boxes_rounded_outward(embedded):
    out, _ = embedded
    crops = {(r["image"], r["region"]): r for r in pq.read_table(out / "regions.parquet").to_pylist()}
    assert crops[("p0", 2)]["crop"] == [60, 30, 110, 90] and crops[("p0", 2)]["box"] == [60.5, 30, 110, 90]
    assert crops[("p0", 1)]["confidence"] == pytest.approx(0.9)
    assert crops[("p0", 1)]["area"] == pytest.approx(40 * 30 / (120 * 96))


def test_cached_caption_embeddings_match_open_clip_encode_text(embedded, reference):
    out, _ = embedded
    net, _, tokenizer = reference
    rows = pq.read_table(out / "captions.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["p0", "p1", "p3", "p4", "p5"]
    text = tokenizer([r["caption"] for r in rows])
    with torch.no_grad():
        want = net.encode_text(text).numpy()
    for r, w, t in zip(rows, want, text):
        assert cos(r["embedding"], w) >= 0.999
        # Token embeddings: one per real token (start, words, end), the last one the pooled one.
        assert r["length"] == len(r["tokens"]) == int((t != 0).sum())
        assert r["tokens"][-1] == r["embedding"]


def test_pooled_embedding_is_the_projected_hidden_state_at_end_of_text(reference):
    net, _, tokenizer = reference
    text = tokenizer(["a red circle", "a large blue triangle to the left of a small pink square", ""])
    with torch.no_grad():
        tokens, pooled, lengths = encode_tokens(net, text)
        want = net.encode_text(text)
        # The hidden states by hand, over the full context: a check on the trimmed computation.
        x = net.token_embedding(text) + net.positional_embedding
        x = net.ln_final(net.transformer(x, attn_mask=net.attn_mask)) @ net.text_projection
    eot = text.argmax(dim=-1)
    assert lengths.tolist() == (eot + 1).tolist() == (text != 0).sum(1).tolist()
    assert tokens.shape == (3, int(lengths.max()), 128)
    assert torch.equal(pooled, tokens[torch.arange(3), eot])
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(tokens[i, :n], x[i, :n], atol=1e-5, rtol=1e-5)


def test_token_embeddings_refuse_a_text_tower_without_end_of_text_pooling(reference):
    net, _, tokenizer = reference
    net.text_pool_type = "first"
    try:
        with pytest.raises(ValueError, match="no end-of-text token"):
            encode_tokens(net, tokenizer(["a"]))
    finally:
        net.text_pool_type = "argmax"


def test_crops_are_preprocessed_by_the_model_transform_bit_for_bit(demo_encoder):
    rng = np.random.default_rng(0)
    crops = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(7, 30), (200, 90), (128, 128)]
    ]
    want = torch.stack([demo_encoder.preprocess(c) for c in crops])
    pixels = demo_encoder.pixels(crops)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64, 3)  # a quarter of float's memory
    got = demo_encoder.model_input(pixels)
    assert torch.equal(got, want) and got.is_contiguous()
    # Any other transform runs whole, crop by crop.
    other = clip.Encoder(
        demo_encoder.net, lambda c: demo_encoder.preprocess(c) * 2, None, demo_encoder.device, 128, "x"
    )
    assert other._split is None and torch.equal(other.model_input(other.pixels(crops)), want * 2)


# --- region weights, zero detections, rejects ----------------------------------------------------


def test_weights_are_conf_area_sim_from_the_cached_values(embedded):
    out, _ = embedded
    regs: dict[str, list[dict]] = {}
    for r in pq.read_table(out / "regions.parquet").to_pylist():
        regs.setdefault(r["image"], []).append(r)
    for c in pq.read_table(out / "captions.parquet").to_pylist():
        rs = regs[c["image"]]
        sims = [cos(r["embedding"], c["embedding"]) for r in rs]
        assert c["similarities"] == pytest.approx(sims, abs=1e-5)
        factors = [r["confidence"] * r["area"] * max(s, 0.0) for r, s in zip(rs, sims)]
        want = [f / sum(factors) for f in factors] if sum(factors) > 0 else [1 / len(rs)] * len(rs)
        assert c["weights"] == pytest.approx(want, abs=1e-5)
        assert sum(c["weights"]) == pytest.approx(1.0, abs=1e-5)


def test_an_image_without_detections_has_only_the_whole_image(embedded):
    out, metrics = embedded
    assert by_key(out, "images", "image")["p1"]["regions"] == 1
    assert by_key(out, "captions")["p1"]["weights"] == [1.0]
    assert metrics["images_without_detections"] == 1


def test_a_detect_reject_is_skipped_and_counted_not_a_zero_vector(embedded):
    out, metrics = embedded
    assert "p2" not in by_key(out, "captions") and "p2" not in by_key(out, "images", "image")
    assert table(out, "rejects") == {
        "key": ["p2"],
        "image": ["p2"],
        "shard": ["00000.tar"],
        "reason": ["no_image"],
        "detail": ["rejected by detect"],
    }
    teacher_keys = [k for shard in sorted((out / "teacher").glob("*.tar")) for k, _ in read_shard(shard)]
    assert teacher_keys == ["p0", "p1", "p3", "p4", "p5"]
    assert metrics["rejects"] == 1 and metrics["rejects_by_reason"] == {"no_image": 1}


def test_metrics_count_pairs_images_regions_and_cache_size(embedded):
    out, metrics = embedded
    assert {k: metrics[k] for k in ("shards", "pairs", "images", "regions")} == {
        "shards": 2,
        "pairs": 5,
        "images": 5,
        "regions": 12,
    }
    assert metrics["regions_per_image"] == 2.4
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert metrics["cache_mb_per_1000_pairs"]["total"] == pytest.approx(size / 5 * 1000 / 2**20, abs=1e-3)


# --- teacher-ready shards -------------------------------------------------------------------------


def test_teacher_shards_hold_every_array_of_a_pair(embedded):
    import webdataset as wds

    out, _ = embedded
    assert sorted(p.name for p in (out / "teacher").glob("*.tar")) == ["00000.tar", "00001.tar"]
    caps = by_key(out, "captions")
    regs: dict[str, list] = {}
    for r in pq.read_table(out / "regions.parquet").to_pylist():
        regs.setdefault(r["image"], []).append(r["embedding"])
    urls = [str(p) for p in sorted((out / "teacher").glob("*.tar"))]
    seen = []
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        key = s["__key__"]
        seen.append(key)
        c = caps[key]
        r, w, t = s["regions.npy"], s["weights.npy"], s["tokens.npy"]
        assert (r.dtype, w.dtype, t.dtype) == (np.float16, np.float32, np.float16)
        assert (
            r.shape == (len(regs[c["image"]]), 128) and w.shape == (len(r),) and t.shape == (c["length"], 128)
        )
        assert s["caption.npy"].shape == s["image.npy"].shape == (128,)
        assert np.array_equal(r, np.asarray(regs[c["image"]], np.float16))
        assert np.array_equal(s["image.npy"], r[0])
        assert np.array_equal(t, np.asarray(c["tokens"], np.float16))
        assert np.array_equal(s["caption.npy"], t[-1])
        assert np.array_equal(w, np.asarray(c["weights"], np.float32))
        assert s["json"] == {"image": c["image"]}
    assert seen == ["p0", "p1", "p3", "p4", "p5"]


# --- images with several captions -----------------------------------------------------------------


def test_an_image_with_several_captions_is_encoded_once(demo_encoder, tmp_path, monkeypatch):
    items = [
        Item("a-0", "a red square", (100, 80), [[10, 10, 40, 40]], [0.9], image="a"),
        Item("b-0", "a blue circle", (90, 90), [], [], image="b"),
        Item("a-1", "a square, red", (100, 80), [[10, 10, 40, 40]], [0.9], image="a"),  # same shard
        Item("c-0", "something", (90, 90), [], [], image="c"),
        Item("a-2", "red square again", (100, 80), [[10, 10, 40, 40]], [0.9], image="a"),  # next shard
        Item("b-1", "the circle", (90, 90), [], [], image="b"),
    ]
    shards, manifest, regions_table = make_dataset(tmp_path, items, shard_size=4)
    encoded = []
    real = clip.Encoder.encode_images

    def counting(self, pixels, normalize=False):
        encoded.append(len(pixels))
        return real(self, pixels, normalize)

    monkeypatch.setattr(clip.Encoder, "encode_images", counting)
    emb.embed(
        shards, manifest, regions_table, tmp_path / "out", tmp_path / "s", demo_encoder, SETTINGS, 2, False
    )
    assert sum(encoded) == 2 + 1 + 1  # a: whole image and one box; b and c: the whole image
    imgs = by_key(tmp_path / "out", "images", "image")
    assert {k: v["key"] for k, v in imgs.items()} == {"a": "a-0", "b": "b-0", "c": "c-0"}
    caps = by_key(tmp_path / "out", "captions")
    assert len(caps) == 6 and caps["a-2"]["shard"] == "00001.tar"
    teacher = {k: s for p in sorted((tmp_path / "out" / "teacher").glob("*.tar")) for k, s in read_shard(p)}
    for key in ("a-1", "a-2"):
        assert teacher[key]["regions.npy"] == teacher["a-0"]["regions.npy"]
        assert teacher[key]["caption.npy"] != teacher["a-0"]["caption.npy"]
    assert teacher["b-1"]["image.npy"] == teacher["b-0"]["image.npy"]


# --- other models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "dim"), [("ViT-B-32", 512), ("ViT-L-14", 768)])
def test_shapes_for_paper_models_with_random_weights(model, dim, tmp_path):
    shards, manifest, regions_table = make_dataset(tmp_path, ITEMS[:2], shard_size=2)
    encoder = clip.load_encoder(model, "none", "cpu")
    assert encoder.dim == dim and encoder.digest == f"{model}:none@seed0"
    plan = emb.Plan.read(manifest).shard("00000.tar")
    dets = emb.read_detections(regions_table, "00000.tar")
    with ThreadPoolExecutor(2) as pool:
        part = emb.embed_shard(shards[0], dets, plan, encoder, replace(SETTINGS, batch_size=8), pool)
    assert part.tables["regions"].num_rows == 3 + 1
    assert part.tables["images"].schema.field("embedding").type.list_size == dim
    for key, fields in part.teacher:
        r = np.load(io.BytesIO(fields["regions.npy"]))
        t = np.load(io.BytesIO(fields["tokens.npy"]))
        assert r.shape == ({"p0": 3, "p1": 1}[key], dim) and t.shape[1] == dim and t.dtype == np.float16
        assert np.load(io.BytesIO(fields["caption.npy"])).shape == (dim,)


def test_random_weights_are_the_same_every_load():
    a = clip.load_encoder(DEMO, "none", "cpu").net.state_dict()
    b = clip.load_encoder(DEMO, "none", "cpu").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- resume and determinism -----------------------------------------------------------------------


def run(dataset, encoder, work: Path, settings=SETTINGS) -> dict:
    shards, manifest, regions_table = dataset
    return emb.embed(
        shards, manifest, regions_table, work / "out", work / "scratch", encoder, settings, 2, False
    )


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_run_resumes_with_only_the_missing_shards(
    dataset, demo_encoder, embedded, tmp_path, monkeypatch
):
    real = emb.embed_shard
    calls = []

    def dies_on_the_second(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill between shards
        return real(path, *args, **kwargs)

    monkeypatch.setattr(emb.run, "embed_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, demo_encoder, tmp_path)
    assert not (tmp_path / "out").exists()
    parts = [
        p for p in (tmp_path / "scratch").rglob("*") if p.is_dir() and p.parent.parent == tmp_path / "scratch"
    ]
    assert [p.name.split("-")[0] for p in parts] == ["00000"]
    assert not list((tmp_path / "scratch").rglob(".*.tmp-*"))  # the unfinished part is gone

    calls.clear()
    metrics = run(dataset, demo_encoder, tmp_path)
    assert calls == ["00001.tar"]
    # The same bytes as one uninterrupted run.
    assert files(tmp_path / "out") == files(embedded[0]) and metrics == embedded[1]


def test_other_settings_are_another_run_whose_parts_replace_the_old(dataset, demo_encoder, tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    run(dataset, demo_encoder, tmp_path, replace(SETTINGS, weights="uniform"))
    assert by_key(out, "captions")["p0"]["weights"] == [pytest.approx(1 / 3)] * 3
    first_run = {p.name for p in scratch.iterdir()}
    run(dataset, demo_encoder, tmp_path, replace(SETTINGS, max_regions=2, context_margin=0.5))
    assert len(first_run | {p.name for p in scratch.iterdir()}) == 2 and len(list(scratch.iterdir())) == 1
    assert by_key(out, "images", "image")["p4"]["regions"] == 2  # the whole image and the best box
    box = [r for r in pq.read_table(out / "regions.parquet").to_pylist() if r["image"] == "p5"][1]
    assert box["crop"] == [0, 0, 95, 96]  # [20, 20, 70, 80] widened by half its size, clipped
    assert box["area"] == pytest.approx(50 * 60 / 96**2)  # of the box, not of the crop


def test_a_stale_regions_table_is_an_error_that_says_so(dataset, demo_encoder, tmp_path):
    shards, manifest, regions_table = dataset
    t = pq.read_table(regions_table)
    write_table(tmp_path / "stale.parquet", t.slice(1), REGIONS_SCHEMA)
    with pytest.raises(emb.EmbedError, match="no row in the regions table.*run detect again"):
        emb.embed(
            shards,
            manifest,
            tmp_path / "stale.parquet",
            tmp_path / "o",
            tmp_path / "s",
            demo_encoder,
            SETTINGS,
        )
    rows = t.to_pylist()
    rows[0]["width"] = 999
    write_table(tmp_path / "resized.parquet", rows, REGIONS_SCHEMA)
    with pytest.raises(emb.EmbedError, match="detect saw 999x96"):
        emb.embed(
            shards,
            manifest,
            tmp_path / "resized.parquet",
            tmp_path / "o",
            tmp_path / "s",
            demo_encoder,
            SETTINGS,
        )


# --- params -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"weights": "max"}, "embed.weights: Input should be 'product', 'conf', 'area', 'sim' or 'uniform'"),
        ({"max_regions": 0}, "embed.max_regions: Input should be greater than 0"),
        ({"context_margin": 1.5}, "embed.context_margin: Input should be less than or equal to 1"),
        ({"batch_size": 64}, "embed.batch_size: unknown key"),  # runtime.batch_size.embed
        ({"shards": 3}, "embed.shards: unknown key"),
    ],
)
def test_bad_embed_params_are_named(change, expected):
    with pytest.raises(ParamsError) as err:
        parse_params({"embed": change})
    assert expected in str(err.value)


def test_the_demo_params_validate():
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()), base_dir=REPO)
    assert params.embed.weights == "product" and params.embed.max_regions is None


def test_stage_writes_embeddings_and_metrics(dataset, tmp_path):
    from stages import embed as stage

    shards, manifest, regions_table = dataset
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["clip"]["pretrained"] = str(DEMO_WEIGHTS)
    raw["clip"]["checkpoint"] = str(DEMO_WEIGHTS)  # what the weights stage would have written
    raw["detector"]["weights"] = "none"
    raw["curate"]["out"] = str(manifest.parent)
    raw["detect"]["out"] = str(regions_table)
    raw["embed"]["out"] = str(tmp_path / "e")
    raw["runtime"].update(
        device="cpu", batch_size={"detect": 32, "embed": 4, "evaluate": 256}, scratch=str(tmp_path / "s")
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    metrics = stage.run(tmp_path / "params.yaml", tmp_path / "m.json", progress=False)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics and metrics["pairs"] == 5
    raw["detect"]["out"] = str(tmp_path / "missing.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(MissingOutput, match="missing.parquet does not exist; run the detect stage first"):
        stage.run(tmp_path / "params.yaml", tmp_path / "m.json", progress=False)

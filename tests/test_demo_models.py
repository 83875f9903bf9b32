"""The demo models: training pieces compute what they claim, checkpoints round-trip through
open_clip's own loader, the committed weights load offline and work on fresh images, and their
cards are measured with the project's metric definitions."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.train
from pipeline import metrics
from pipeline.config import World
from pipeline.demo import cards, clip_training
from pipeline.demo.clip_training import CLIP_MODEL
from pipeline.demo.pretrain import generate_pretrain_split, split_jobs
from pipeline.demo.world.captions import captions as describe
from pipeline.demo.world.paint import PRETRAIN, Job, make_sample
from pipeline.evalsets import SINGLE_PROMPT
from pipeline.models.clip import create, save_checkpoint
from stages import demo_models as stage

from .helpers import REPO


def test_the_clip_schedule_is_the_pipelines():
    """The demo CLIP trains on pipeline.train's warm-up + cosine schedule, with these values."""
    assert clip_training.lr_factor is pipeline.train.lr_factor
    factor = clip_training.lr_factor
    assert factor(0, 100, 10) == pytest.approx(0.1)
    assert factor(9, 100, 10) == pytest.approx(1.0)
    assert factor(10, 100, 10) == pytest.approx(1.0)
    assert factor(55, 100, 10) == pytest.approx(0.5)
    assert factor(100, 100, 10) == pytest.approx(0.0)


def test_card_retrieval_figures_are_pipeline_metrics_on_a_hand_made_case():
    # Three images; captions 0, 1 of image 0, caption 2 of image 1, caption 3 of image 2.
    image_emb = torch.eye(3)
    text_emb = torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.8, 0.0], [0.5, 0.0, 0.5]])
    text_image = torch.tensor([0, 0, 1, 2])
    figures = cards.retrieval_figures(image_emb, text_emb, text_image)
    # Text→image: caption 0 ranks image 0 second, 1 and 2 first; caption 3 ties images 0 and 2,
    # and a tie goes against the query: second. R@1 = 2/4, MRR = (1/2 + 1 + 1 + 1/2) / 4.
    t2i = figures["text_to_image"]
    assert t2i["R@1"] == 0.5 and t2i["R@5"] == 1.0 and t2i["MRR"] == 0.75 and t2i["mAP"] == 0.75
    # Image→text: image 0's captions 1 (first) and 0 (below caption 3: third); image 1's caption 2
    # ties caption 0 (second); image 2's caption 3 first.
    i2t = figures["image_to_text"]
    assert i2t["R@1"] == round(2 / 3, 4) and i2t["MRR"] == round((1 + 0.5 + 1) / 3, 4)
    assert i2t["mAP"] == round(((1 + 2 / 3) / 2 + 0.5 + 1) / 3, 4)
    ranks = metrics.retrieval_ranks(image_emb, text_emb, text_image)
    for direction, r in ranks.items():
        expected = {k: round(v, 4) for k, v in metrics.summarise(r, (1, 5, 10)).items()}
        assert figures[direction] == expected
    assert figures["images"] == 3 and figures["captions"] == 4
    assert figures["chance"]["text_to_image"]["R@1"] == round(1 / 3, 4)


def test_card_zero_shot_figures_score_ties_against_the_image_as_pipeline_metrics_does():
    names = ["red circle", "red star", "blue circle"]
    class_emb = torch.eye(3)
    # Image 0: its class first. Image 1 (red star): ties red star with blue circle — a miss, the
    # prediction blue circle (colour and shape both wrong). Image 2 (blue circle): red circle best.
    image_emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.6], [0.9, 0.0, 0.1]])
    labels = torch.tensor([0, 1, 2])
    figures = cards.zero_shot_figures(image_emb, class_emb, labels, names)
    assert cards.predictions(image_emb @ class_emb.T, labels).tolist() == [0, 2, 0]
    assert (
        figures["top1"]
        == round(1 / 3, 4)
        == round(metrics.zero_shot_metrics(image_emb, class_emb, labels)["top1"], 4)
    )
    assert figures["colour_right"] == round(1 / 3, 4) and figures["shape_right"] == round(2 / 3, 4)
    assert figures["chance"] == {"top1": round(1 / 3, 4), "top5": 1.0}


def test_box_iou_exact():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    assert cards.box_iou(a, b).tolist() == [[1.0, pytest.approx(50 / 150), 0.0]]


def test_checkpoint_round_trip_through_open_clip(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model, preprocess, tokenizer = create(CLIP_MODEL, "none")
    path = tmp_path / "clip.pt"
    save_checkpoint(model, path)
    loaded, _, _ = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=str(path))
    loaded.eval()
    x = preprocess(Image.new("RGB", (120, 100), (200, 30, 30)))[None]
    t = tokenizer(["a red circle"])
    with torch.no_grad():
        for enc in ("encode_image", "encode_text"):
            arg = x if enc == "encode_image" else t
            a, b = getattr(model, enc)(arg, normalize=True), getattr(loaded, enc)(arg, normalize=True)
            assert torch.nn.functional.cosine_similarity(a, b).item() > 0.999  # float16 storage


# --- the committed weights -------------------------------------------------------------------

WEIGHTS = REPO / "demo" / "weights"
CLIP_FILE = WEIGHTS / f"clip-{CLIP_MODEL}.pt"
YOLO_FILE = WEIGHTS / "yolo-demo-v8n.pt"
FRESH = 10_000_000  # far beyond every index the pretraining split and its measurements used


def fresh_image(i: int):
    cfg = World()
    s = make_sample(Job(PRETRAIN, FRESH + i), cfg.seed, tuple(cfg.image_size), cfg.max_objects)
    return Image.open(io.BytesIO(s.data)).convert("RGB"), s.scene


def test_committed_clip_loads_offline_and_retrieves_fresh_images():
    import open_clip

    card = json.loads(CLIP_FILE.with_suffix(".json").read_text())
    assert CLIP_FILE.stat().st_size < 25 * 2**20
    assert card["quality"]["zero_shot"]["top1"] > 5 * card["quality"]["zero_shot"]["chance"]["top1"]
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=str(CLIP_FILE))
    model.eval()
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
    images, captions = [], []
    for i in range(20):
        image, scene = fresh_image(i)
        images.append(preprocess(image))
        captions.append(describe(scene, np.random.default_rng(i), 1, "coco")[0])
    with torch.no_grad():
        img = model.encode_image(torch.stack(images), normalize=True)
        txt = model.encode_text(tokenizer(captions), normalize=True)
    assert img.shape == (20, 128) and torch.allclose(img.norm(dim=1), torch.ones(20), atol=1e-4)
    # Text→image among 20 fresh images: far above chance (1/20 at R@1).
    r1 = float((torch.argmax(txt @ img.T, dim=1) == torch.arange(20)).float().mean())
    assert r1 >= 0.3


def test_committed_clip_tells_shapes_apart_on_fresh_images():
    """Zero-shot among the ten shapes of one colour, on fresh single-object images: a CLIP that
    only learned colours (as a small ViT trained for the same time did) sits at chance, 0.1."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=str(CLIP_FILE))
    model.eval()
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
    samples = cards.paint(cards.WorldDraw.of(World()), cards.class_jobs(50_000, 2))
    images = torch.stack([preprocess(cards.image(s)) for s in samples])
    names = cards.COLOUR_SHAPE_CLASSES
    labels = [k for k in range(len(names)) for _ in range(2)]
    colour = np.array([n.split()[0] for n in names])
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokenizer([SINGLE_PROMPT.format(n) for n in names]), normalize=True)
    scores = (img @ txt.T).numpy()
    scores[colour[labels][:, None] != colour[None, :]] = -np.inf  # the image's own colour only
    right = int((scores.argmax(axis=1) == np.array(labels)).sum())
    assert len(labels) == 200 and right / len(labels) >= 0.3, right


def test_committed_detector_finds_the_objects_of_fresh_images():
    from ultralytics import YOLO

    card = json.loads(YOLO_FILE.with_suffix(".json").read_text())
    assert YOLO_FILE.stat().st_size < 25 * 2**20 and card["quality_fresh_images"]["recall_iou50"] >= 0.9
    model = YOLO(str(YOLO_FILE))
    found = total = 0
    for i in range(20):
        image, scene = fresh_image(100 + i)
        boxes = model.predict(image, imgsz=160, conf=0.25, device="cpu", verbose=False)[0].boxes.xyxy.numpy()
        gt = np.array([o.box for o in scene.objects], float)[np.array(scene.visible) >= 0.6]
        if len(boxes):
            found += int((cards.box_iou(gt, boxes) >= 0.5).any(axis=1).sum())
        total += len(gt)
    assert total > 20 and found / total >= 0.9, (found, total)


def test_default_params_use_the_committed_weights():
    from pipeline.config import load_params

    params = load_params(REPO / "params.yaml")
    assert (REPO / params.clip.pretrained).resolve() == CLIP_FILE.resolve()
    assert (REPO / params.detector.weights).resolve() == YOLO_FILE.resolve()


def test_colour_groups_and_hard_negative_batches():
    from pipeline.demo.clip_training import batch_indices, colour_groups

    groups = colour_groups(
        [["A red circle."], ["A blue star and a red ring."], ["Two green objects."], ["A red heart"]]
    )
    assert {c: g.tolist() for c, g in groups.items()} == {"red": [0, 3], "green": [2]}
    order = torch.tensor([2, 0, 1, 3])
    gen = torch.Generator().manual_seed(0)
    batch = batch_indices(order, 0, 3, 2, {"red": np.array([0, 1, 3])}, gen)
    # One image from the permutation, then two of the red group, without repeats.
    assert batch[0] == 2 and set(batch[1:].tolist()) <= {0, 1, 3} and len(set(batch.tolist())) == 3
    assert torch.equal(batch_indices(order, 1, 2, 0, {}, gen), torch.tensor([1, 3]))


# --- training and cards on tiny inputs ------------------------------------------------------------

TINY = World(seed=3, image_size=(64, 80))


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "pretrain-web"
    generate_pretrain_split(TINY, folder, 24, 6, 0.25, progress=False, domain="web")
    return folder


def test_train_clip_runs_on_a_tiny_split(tiny_split):
    model, info = clip_training.train_clip(tiny_split, epochs=2, batch_size=8, warmup=1)
    assert info["train_images"] == 24 and info["steps"] == 6 and info["captions_per_image"] == 5
    assert math.isfinite(info["final_loss"]) and not model.training
    # The preprocessed images are cached beside the split.
    assert len(list(tiny_split.glob("preprocessed-train-*.pt"))) == 1


def test_held_out_val_images_are_the_splits_own(tiny_split):
    """A card's retrieval images are drawn by the very jobs that wrote the split's val images."""
    held = cards.paint(cards.WorldDraw.of(TINY), split_jobs("val", 24, 6, domain="web"))
    rows = [json.loads(line) for line in (tiny_split / "captions.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [s.data for s in held] == [(tiny_split / r["image"]).read_bytes() for r in val]
    assert [list(s.captions) for s in held] == [r["captions"] for r in val]


def _params(tmp_path, seed: int = 0):
    path = tmp_path / "params.yaml"
    path.write_text(f"world:\n  seed: {seed}\nruntime:\n  workers: 1\n")
    return path


def test_demo_cards_rewrites_the_quality_and_keeps_the_provenance(tmp_path):
    torch.manual_seed(0)
    model, _, _ = create(CLIP_MODEL, "none")
    save_checkpoint(model, tmp_path / f"clip-{CLIP_MODEL}.pt")
    held = cards.ClipHeldOut(cards.WorldDraw.of(TINY), 30, 4, 40, 1, 5_000_000, 3)
    provenance = {"command": "dclip demo train-models", "model": CLIP_MODEL, "training": {"seconds": 1.0}}
    card = {**provenance, "quality": {"old": 1}, "quality_notes": {"retrieval": "n"}, "size_mb": 1.0}
    (tmp_path / f"clip-{CLIP_MODEL}.json").write_text(json.dumps({**card, "held_out": cards.as_dict(held)}))
    out = stage.cards(_params(tmp_path), tmp_path, only="clip")
    written = json.loads((tmp_path / f"clip-{CLIP_MODEL}.json").read_text())
    assert list(written) == [
        "command", "model", "training", "quality_command", "metrics", "held_out", "quality", "quality_notes",
        "size_mb",
    ]  # fmt: skip
    assert {k: written[k] for k in provenance} == provenance and written["held_out"] == cards.as_dict(held)
    quality = written["quality"]
    assert quality == out[f"clip-{CLIP_MODEL}.json"]
    assert quality["retrieval"]["images"] == 4 and quality["retrieval"]["captions"] == 20
    assert quality["curated_domain_retrieval"]["images"] == 3
    assert set(quality["retrieval"]["text_to_image"]) == {"R@1", "R@5", "R@10", "mAP", "MRR"}
    zero_shot = quality["zero_shot"]
    assert zero_shot["images"] == zero_shot["classes"] == 100 and zero_shot["prompt"] == SINGLE_PROMPT
    assert zero_shot["chance"]["top1"] == 0.01 and "top1" in zero_shot["bare_label"]
    assert written["metrics"].startswith("pipeline.metrics")


def test_demo_cards_measures_the_committed_detector(tmp_path):
    shutil.copy(YOLO_FILE, tmp_path / YOLO_FILE.name)
    held = cards.DetectorHeldOut(cards.WorldDraw.of(World()), 22_000, 6)
    card = {"command": "c", "training": {"val_recall": 0.9}, "quality_fresh_images": {}, "size_mb": 5.9}
    (tmp_path / YOLO_FILE.with_suffix(".json").name).write_text(
        json.dumps({**card, "held_out": cards.as_dict(held)})
    )
    stage.cards(_params(tmp_path), tmp_path, only="yolo")
    written = json.loads((tmp_path / YOLO_FILE.with_suffix(".json").name).read_text())
    fresh = written["quality_fresh_images"]
    assert written["training"] == card["training"] and fresh["images"] == 6 and fresh["objects"] > 0
    assert 0.5 <= fresh["recall_iou50"] <= 1.0 and written["metrics"] == cards.DETECTOR_METRICS


def test_demo_cards_refuses_a_card_from_another_world(tmp_path):
    from pipeline.errors import InputError

    shutil.copy(YOLO_FILE, tmp_path / YOLO_FILE.name)
    card = {"data": {"world_seed": 0, "train_images": 10, "val_images": 2}, "quality_fresh_images": {}}
    (tmp_path / YOLO_FILE.with_suffix(".json").name).write_text(json.dumps(card))
    with pytest.raises(InputError, match="world seed 0"):
        stage.cards(_params(tmp_path, seed=1), tmp_path, only="yolo")

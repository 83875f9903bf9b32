"""The demo models: training pieces compute what they claim, checkpoints round-trip through
open_clip's own loader, and the committed weights load offline and work on fresh images."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import demo_models as dm
from pipeline.config import World
from pipeline.models.clip import create, save_checkpoint
from pipeline.world.captions import captions as describe
from pipeline.world.generate import PRETRAIN, Job, make_sample

from .conftest import REPO


def test_cosine_schedule_exact_values():
    assert dm.cosine_schedule(0, 100, 10) == pytest.approx(0.1)
    assert dm.cosine_schedule(9, 100, 10) == pytest.approx(1.0)
    assert dm.cosine_schedule(10, 100, 10) == pytest.approx(1.0)
    assert dm.cosine_schedule(55, 100, 10) == pytest.approx(0.5)
    assert dm.cosine_schedule(100, 100, 10) == pytest.approx(0.0)


def test_recall_at_k_exact():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    positives = torch.tensor([[False, False, True], [True, False, False]])
    # Row 0: positive ranked 2nd; row 1: positive ranked 2nd.
    assert dm.recall_at_k(scores, positives, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}
    positives[1] = torch.tensor([False, True, True])
    assert dm.recall_at_k(scores, positives, ks=(1, 2)) == {"R@1": 0.5, "R@2": 1.0}


def test_box_iou_exact():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    assert dm.box_iou(a, b).tolist() == [[1.0, pytest.approx(50 / 150), 0.0]]


def test_checkpoint_round_trip_through_open_clip(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model, preprocess, tokenizer = create(dm.CLIP_MODEL, "none")
    path = tmp_path / "clip.pt"
    save_checkpoint(model, path)
    loaded, _, _ = open_clip.create_model_and_transforms(dm.CLIP_MODEL, pretrained=str(path))
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
CLIP_FILE = WEIGHTS / f"clip-{dm.CLIP_MODEL}.pt"
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
    assert card["quality"]["zero_shot"]["top1"] > 5 * card["quality"]["zero_shot"]["chance"]
    model, _, preprocess = open_clip.create_model_and_transforms(dm.CLIP_MODEL, pretrained=str(CLIP_FILE))
    model.eval()
    tokenizer = open_clip.get_tokenizer(dm.CLIP_MODEL)
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

    model, _, preprocess = open_clip.create_model_and_transforms(dm.CLIP_MODEL, pretrained=str(CLIP_FILE))
    model.eval()
    tokenizer = open_clip.get_tokenizer(dm.CLIP_MODEL)
    images, labels, names = dm.class_images(World(), preprocess, per_class=2, offset=50_000)
    colour = np.array([n.split()[0] for n in names])
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokenizer([dm.ZERO_SHOT_PROMPT.format(n) for n in names]), normalize=True)
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
            found += int((dm.box_iou(gt, boxes) >= 0.5).any(axis=1).sum())
        total += len(gt)
    assert total > 20 and found / total >= 0.9, (found, total)


def test_default_params_use_the_committed_weights():
    from pipeline.config import load_params

    params = load_params(REPO / "params.yaml")
    assert (REPO / params.clip.pretrained).resolve() == CLIP_FILE.resolve()
    assert (REPO / params.detector.weights).resolve() == YOLO_FILE.resolve()


def test_colour_groups_and_hard_negative_batches():
    import torch

    from pipeline.demo_models import batch_indices, colour_groups

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

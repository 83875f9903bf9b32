"""The pieces of the demo models' training code compute what they claim; checkpoints round-trip
through open_clip's own loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import demo_models as dm
from pipeline.models.clip import create, save_checkpoint


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

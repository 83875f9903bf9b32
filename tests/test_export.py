"""`dclip export`: a checkpoint as a folder that open_clip loads by itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pipeline.errors import InputError, MissingOutput
from pipeline.export import CARD, CONFIG, WEIGHTS, Card, comparison, export
from pipeline.models.clip import create, save_checkpoint

from .helpers import REPO

MODEL = "DCLIP-Demo-RN64"
DEMO_WEIGHTS = REPO / "demo" / "weights" / f"clip-{MODEL}.pt"
CARD_INFO = Card(
    name="a-student",
    architecture=MODEL,
    base="the demo CLIP",
    description="A test export.",
    details={"Teacher target": "paper"},
)
METRICS = {
    "base": {
        "retrieval": {"coco": {"text_to_image": {"R@1": 0.25}}},
        "zeroshot": {"imagenet": {"top1": 0.5}},
    },
    "student": {
        "retrieval": {"coco": {"text_to_image": {"R@1": 0.3125}}},
        "zeroshot": {"imagenet": {"top1": 0.5}},
    },
}


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A float16 checkpoint unlike the base: the demo weights with the image tower perturbed."""
    net, _, _ = create(MODEL, str(DEMO_WEIGHTS))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("student") / "student.pt"
    save_checkpoint(net, path)
    return path


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "student-open_clip"
    export(MODEL, student, out, CARD_INFO, METRICS)
    return out


def test_the_folder_loads_with_open_clip_alone_and_encodes_as_the_checkpoint(student, exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted([CONFIG, WEIGHTS, CARD])
    ours, preprocess, tokenizer = create(MODEL, str(student))
    theirs, _, theirs_preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    theirs.eval()
    their_tokenizer = open_clip.get_tokenizer(f"local-dir:{exported}")
    captions = ["a red circle left of a blue square", "two green stars"]
    assert torch.equal(their_tokenizer(captions), tokenizer(captions))
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(theirs.encode_image(pixels), ours.encode_image(pixels))
        assert torch.equal(theirs.encode_text(tokenizer(captions)), ours.encode_text(tokenizer(captions)))
    # The preprocessing travels too (CLIP's resize, crop and normalisation, from the config file).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    assert torch.equal(theirs_preprocess(image), preprocess(image))


def test_every_file_of_the_folder_has_the_same_permissions(exported):
    # Before: the safetensors file was 0600 (safetensors' own), unreadable to a colleague.
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir()}
    assert len(set(modes.values())) == 1 and modes["open_clip_config.json"] & 0o044, modes


def test_the_weights_are_the_checkpoint_s_own_float16_values(student, exported):
    stored = torch.load(student, map_location="cpu", weights_only=True)["state_dict"]
    tensors = load_file(str(exported / WEIGHTS))
    assert tensors.keys() == stored.keys()
    assert all(torch.equal(tensors[k], stored[k]) and tensors[k].dtype == stored[k].dtype for k in stored)
    config = json.loads((exported / CONFIG).read_text())
    assert config["model_cfg"] == open_clip.get_model_config(MODEL)


def test_the_card_is_open_clip_s_format_with_the_test_figures(exported):
    card = (exported / CARD).read_text()
    assert card.startswith("---\ntags:\n- clip\n- open_clip\n- distillation\nlibrary_name: open_clip\n")
    assert "# Model card for a-student\n" in card and "- **Teacher target:** paper\n" in card
    assert "create_model_and_transforms('local-dir:PATH')" in card
    assert "| coco text→image R@1 | 25.00 | 31.25 |" in card
    assert "| imagenet zero-shot top1 | 50.00 | 50.00 |" in card


def test_comparison_rows_only_for_figures_some_model_has():
    table = comparison({"base": {"zeroshot": {"cifar10": {"top1": 0.123456}}}, "student": {}})
    assert table.splitlines() == [
        "| test figure (%) | base | student |",
        "| --- | ---: | ---: |",
        "| cifar10 zero-shot top1 | 12.35 | – |",
    ]
    assert comparison({"base": {}}) == ""


def test_the_same_checkpoint_exports_to_the_same_bytes(student, exported, tmp_path):
    again = tmp_path / "again"
    export(MODEL, student, again, CARD_INFO, METRICS)

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    assert digest(again) == digest(exported)


def test_a_checkpoint_of_another_architecture_is_named(student, tmp_path):
    with pytest.raises(InputError, match=r"student\.pt: not a checkpoint of 'RN50'"):
        export("RN50", student, tmp_path / "out", CARD_INFO)
    with pytest.raises(InputError, match="open_clip has no config of that name"):
        export("No-Such-Model", student, tmp_path / "out", CARD_INFO)
    assert not (tmp_path / "out").exists()


def test_the_stage_needs_the_student(tmp_path):
    from stages import export as stage

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["clip"]["pretrained"] = str(DEMO_WEIGHTS)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(MissingOutput, match="student.pt does not exist; run the distill stage first"):
        stage.run(tmp_path / "params.yaml")

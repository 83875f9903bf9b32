"""weights: what clip.pretrained and detector.weights name becomes one checkpoint file each, loadable
by open_clip and ultralytics; local files copied byte for byte, random initialisations the same
bytes every run, and failures named by their params key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ParamsError
from pipeline.models.clip import create
from pipeline.weights import WeightsError, fetch_clip, fetch_detector

from .helpers import REPO

DEMO_CLIP = REPO / "demo" / "weights" / "clip-DCLIP-Demo-RN64.pt"
DEMO_YOLO = REPO / "demo" / "weights" / "yolo-demo-v8n.pt"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_local_clip_checkpoint_is_copied_byte_for_byte_and_loads(tmp_path):
    out = tmp_path / "w" / "clip.pt"
    info = fetch_clip("DCLIP-Demo-RN64", str(DEMO_CLIP), out)
    assert sha(out) == sha(DEMO_CLIP) == info["sha256"] and info["kind"] == "file"
    assert info["bytes"] == DEMO_CLIP.stat().st_size
    a, b = create("DCLIP-Demo-RN64", str(out))[0], create("DCLIP-Demo-RN64", str(DEMO_CLIP))[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_clip_none_is_the_same_random_initialisation_every_run(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert fetch_clip("DCLIP-Demo-RN64", "none", first)["kind"] == "none"
    fetch_clip("DCLIP-Demo-RN64", "none", second)
    assert sha(first) == sha(second)
    # Not the demo's trained weights, and loadable as a float32 state dict.
    state = torch.load(first, weights_only=True)["state_dict"]
    assert state["logit_scale"].dtype == torch.float32 and sha(first) != sha(DEMO_CLIP)


def test_clip_weights_of_another_architecture_fail_naming_the_key(tmp_path):
    with pytest.raises(
        WeightsError, match=r"clip.pretrained: cannot load .*clip-DCLIP-Demo-RN64.pt.* for 'ViT-B-32'"
    ):
        fetch_clip("ViT-B-32", str(DEMO_CLIP), tmp_path / "clip.pt")
    assert not (tmp_path / "clip.pt").exists()


def test_an_open_clip_tag_offline_fails_naming_the_key(tmp_path):
    # Tests run with HF_HUB_OFFLINE=1: the download cannot happen and says so.
    with pytest.raises(WeightsError, match=r"clip.pretrained: cannot load 'openai' for 'RN50-quickgelu'"):
        fetch_clip("RN50-quickgelu", "openai", tmp_path / "clip.pt")
    assert not (tmp_path / "clip.pt").exists()


def test_a_local_detector_checkpoint_is_copied_byte_for_byte(tmp_path):
    out = tmp_path / "detector.pt"
    info = fetch_detector("yolov8n.yaml", str(DEMO_YOLO), out)
    assert sha(out) == sha(DEMO_YOLO) == info["sha256"] and info["kind"] == "file"


def test_detector_none_is_the_same_random_initialisation_every_run(tmp_path):
    from ultralytics import YOLO

    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert fetch_detector("yolov8n.yaml", "none", first)["kind"] == "none"
    fetch_detector("yolov8n.yaml", "none", second)
    assert sha(first) == sha(second)
    yolo = YOLO(str(first))
    assert yolo.task == "detect" and len(yolo.names) == 80  # the yaml's 80 COCO classes


def test_a_classifier_is_not_a_detector(tmp_path):
    with pytest.raises(WeightsError, match="detector.weights: 'none' is a 'classify' model, not a detector"):
        fetch_detector("yolov8n-cls.yaml", "none", tmp_path / "detector.pt")
    assert not (tmp_path / "detector.pt").exists()


def test_a_corrupt_detector_file_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"detector.weights: cannot load '.*bad.pt'"):
        fetch_detector("yolov8n.yaml", str(bad), tmp_path / "detector.pt")
    assert not (tmp_path / "detector.pt").exists()


def test_the_stage_writes_both_checkpoints_where_params_say(tmp_path):
    from stages import weights as stage

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "demo").symlink_to(REPO / "demo")
    params["clip"]["checkpoint"] = "w/c.pt"
    params["detector"]["checkpoint"] = "w/d.pt"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    summary = stage.run(tmp_path / "params.yaml")
    assert sha(tmp_path / "w" / "c.pt") == sha(DEMO_CLIP) == summary["clip"]["sha256"]
    assert sha(tmp_path / "w" / "d.pt") == sha(DEMO_YOLO) == summary["detector"]["sha256"]

    params["detector"]["model"] = "yolov8n-cls.yaml"
    params["detector"]["weights"] = "none"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"params.yaml: detector.weights: 'none' is a 'classify' model"):
        stage.run(tmp_path / "params.yaml")

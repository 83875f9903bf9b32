"""Stage `weights` (dvc.yaml): the base CLIP and the detector that params name, as the checkpoint
files every later stage loads (clip.checkpoint, detector.checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ParamsError, load_params
from pipeline.weights import WeightsError, fetch_clip, fetch_detector


def run(params_file: Path) -> dict:
    params = load_params(params_file, only=("clip", "detector"))
    root = params_file.parent
    try:
        clip = fetch_clip(params.clip.model, params.clip.pretrained, root / params.clip.checkpoint, root)
        detector = fetch_detector(
            params.detector.model, params.detector.weights, root / params.detector.checkpoint, root
        )
    except WeightsError as err:
        raise ParamsError(f"{params_file}: {err}") from None
    summary = {"clip": clip, "detector": detector}
    print(json.dumps(summary))
    return summary

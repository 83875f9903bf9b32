"""The base models' weights as local files: what `clip.pretrained` and `detector.weights` name (a
local checkpoint, an open_clip tag or an ultralytics release, or "none") becomes one checkpoint
file each, which every later stage loads. As files they are DVC outputs: hashed, cached, pushed to
a remote, so a colleague without internet pulls them instead of downloading them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.files import atomic_file, atomic_torch_save, file_digest
from pipeline.models.detector import prepare_ultralytics


class WeightsError(InputError):
    """Weights that cannot be had or loaded; the message names the params key."""


def _summary(source: str, kind: str, out: Path) -> dict:
    return {
        "source": source,
        "kind": kind,
        "file": str(out),
        "sha256": file_digest(out),
        "bytes": out.stat().st_size,
    }


def fetch_clip(model: str, pretrained: str, out: Path, base_dir: Path | str = ".") -> dict:
    """Write the CLIP checkpoint of `model` that `pretrained` names to `out`, in a form that
    `open_clip.create_model_and_transforms(model, pretrained=out)` loads, and check that it does.

    A local file is copied byte for byte; an open_clip tag is downloaded by open_clip (online, once)
    and saved as a float32 state dict; "none" is the architecture randomly initialised from seed 0,
    the same bytes every run."""
    from pipeline.models.clip import create, save_checkpoint

    path = Path(base_dir) / pretrained
    kind = "none" if pretrained == "none" else "file" if path.is_file() else "open_clip tag"
    try:
        if kind == "file":
            create(model, str(path))  # loads: the architecture and the file agree
            with atomic_file(out) as tmp:
                shutil.copyfile(path, tmp)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net, _, _ = create(model, pretrained)
            save_checkpoint(net, out, half=False)
            create(model, str(out))
    except Exception as err:  # open_clip raises RuntimeError, FileNotFoundError, HTTP errors, ...
        raise WeightsError(f"clip.pretrained: cannot load {pretrained!r} for {model!r}: {err}") from None
    return _summary(pretrained, kind, out)


def fetch_detector(model: str, weights: str, out: Path, base_dir: Path | str = ".") -> dict:
    """Write the YOLO checkpoint that `weights` names to `out`, loadable by `YOLO(out)`.

    A local file is copied byte for byte; an ultralytics release name (e.g. yolov8x.pt) is
    downloaded by ultralytics (online, once); "none" is the architecture `model` randomly
    initialised from seed 0, saved without a date so that the bytes are the same every run."""
    prepare_ultralytics()
    from ultralytics import YOLO
    from ultralytics.utils.downloads import attempt_download_asset

    path = Path(base_dir) / weights
    kind = "none" if weights == "none" else "file" if path.is_file() else "ultralytics release"
    try:
        if kind == "file":
            with atomic_file(out) as tmp:
                shutil.copyfile(path, tmp)
        elif kind == "ultralytics release":
            with tempfile.TemporaryDirectory() as folder, atomic_file(out) as tmp:
                shutil.copyfile(attempt_download_asset(Path(folder) / weights), tmp)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                yolo = YOLO(model)
            net = yolo.model
            assert isinstance(net, torch.nn.Module)  # ultralytics types Model.model as its source name
            atomic_torch_save({"model": net.half(), "train_args": {}, "date": None}, out)
        task = YOLO(str(out)).task
    except Exception as err:  # ultralytics raises ConnectionError, FileNotFoundError, ...
        out.unlink(missing_ok=True)
        raise WeightsError(f"detector.weights: cannot load {weights!r} (model {model!r}): {err}") from None
    if task != "detect":
        out.unlink()
        raise WeightsError(f"detector.weights: {weights!r} is a {task!r} model, not a detector")
    return _summary(weights, kind, out)

"""ultralytics YOLO for batch inference: loaded offline, fused, fed by our own batches.

`YOLO.predict()` decodes, letterboxes and post-processes one source at a time in its own loop; a
stage that streams shards wants the pieces instead: the letterbox for its decode workers, and one
forward + NMS per batch. The pieces are ultralytics' own (AutoBackend, LetterBox,
non_max_suppression, scale_boxes), used as its DetectionPredictor uses them, so the boxes equal
predict()'s on a batch of images (a single image is letterboxed to a rectangle there, not a
square, which moves a box by a fraction of a pixel).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.files import file_digest
from pipeline.runtime import import_ultralytics, pick_device


class DetectorError(InputError, RuntimeError):
    """A detector that cannot be loaded or used as asked; the message says why."""


@dataclass(frozen=True)
class Detections:
    """A batch's detections, flat: image i owns the next counts[i] rows, most confident first."""

    boxes: np.ndarray  # (n, 4) float32 xyxy, pixels of the image as given
    confidences: np.ndarray  # (n,) float32
    classes: np.ndarray  # (n,) int32
    counts: np.ndarray  # (images,) int64


@dataclass
class Detector:
    """A fused YOLO on a device; float16 on CUDA, float32 on the CPU."""

    backend: torch.nn.Module  # ultralytics' AutoBackend
    names: dict[int, str]
    imgsz: int
    device: torch.device
    digest: str  # what the weights are: for cache keys
    _letterbox: Any = field(repr=False, default=None)  # ultralytics LetterBox

    @property
    def half(self) -> bool:
        return bool(self.backend.fp16)

    def letterbox(self, image: np.ndarray) -> np.ndarray:
        """An RGB (h, w, 3) uint8 image resized and padded to (imgsz, imgsz, 3), as predict() does
        for a batch. Thread-safe: LetterBox keeps no state between calls."""
        return self._letterbox(image=image)

    def class_ids(self, classes: list[int | str] | None) -> list[int] | None:
        """Class filter entries (ids or names) as ids; ValueError naming any unknown one."""
        if classes is None:
            return None
        by_name = {n: i for i, n in self.names.items()}
        ids = [c if isinstance(c, int) else by_name.get(c) for c in classes]
        unknown = [c for c, i in zip(classes, ids) if i not in self.names]
        if unknown:
            raise ValueError(f"unknown class(es) {unknown}; the model has {len(self.names)}: {self.names}")
        return sorted({i for i in ids if i is not None})

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """The raw head output of a (n, imgsz, imgsz, 3) uint8 RGB batch."""
        im = torch.from_numpy(batch).to(self.device, non_blocking=True)
        im = im.permute(0, 3, 1, 2).contiguous()  # uint8 to the device first: a quarter of the bytes
        im = (im.half() if self.half else im.float()).div_(255)
        out = self.backend(im)
        return out[0] if isinstance(out, list | tuple) else out

    def detect(
        self,
        batch: np.ndarray,
        shapes: np.ndarray,
        conf: float,
        iou: float,
        classes: list[int] | None = None,
        max_det: int = 300,
    ) -> Detections:
        """Boxes of a letterboxed batch in the pixels of each original image ((n, 2) heights and
        widths in `shapes`), after ultralytics' NMS with predict()'s settings."""
        return self.postprocess(self.forward(batch), shapes, conf, iou, classes, max_det)

    @torch.inference_mode()
    def postprocess(
        self,
        preds: torch.Tensor,
        shapes: np.ndarray,
        conf: float,
        iou: float,
        classes: list[int] | None = None,
        max_det: int = 300,
    ) -> Detections:
        """`detect` after the forward pass: NMS, then boxes scaled back to each image."""
        from ultralytics.utils import nms, ops

        kept = nms.non_max_suppression(
            preds,
            conf,
            iou,
            classes,
            agnostic=False,
            max_det=max_det,
            end2end=getattr(self.backend, "end2end", False),
        )
        kept = [k.float() for k in kept]  # scale in float32: float16 would round the pixels again
        for det, (h, w) in zip(kept, shapes.tolist()):  # per image, in place; no per-box Python
            ops.scale_boxes((self.imgsz, self.imgsz), det[:, :4], (h, w))
        flat = torch.cat(kept).cpu().numpy() if kept else np.zeros((0, 6), np.float32)
        return Detections(
            boxes=np.ascontiguousarray(flat[:, :4], dtype=np.float32),
            confidences=np.ascontiguousarray(flat[:, 4], dtype=np.float32),
            classes=flat[:, 5].astype(np.int32),
            counts=np.array([len(k) for k in kept], dtype=np.int64),
        )


def prepare_ultralytics() -> None:
    """Make ultralytics' trainer quiet and offline. It wants Arial.ttf in its config folder and
    tries to download it otherwise (matplotlib ships DejaVu Sans, which serves); and with dvclive
    installed its DVC callback would turn the run into a DVC experiment of this repository. The
    logger integrations are switched off in ultralytics' settings, its documented way."""
    import_ultralytics()  # first: its import must not change OMP_NUM_THREADS
    import matplotlib
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    integrations = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
    if any(SETTINGS.get(k) for k in integrations):
        SETTINGS.update({k: False for k in integrations})

    target = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", target)


def load(model: str, weights: str, imgsz: int, device: str = "auto", base_dir: Path | str = ".") -> Detector:
    """A Detector from params: `weights` a checkpoint path (relative to base_dir), an ultralytics
    release name (downloaded by ultralytics when online), or "none" for the architecture in
    `model`, randomly initialised from a fixed seed (the same weights every run)."""
    prepare_ultralytics()
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox
    from ultralytics.nn.autobackend import AutoBackend

    dev = pick_device(device)
    path = Path(base_dir) / weights
    try:
        if weights == "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                yolo = YOLO(model)
            digest = f"{model}@seed0"
        else:
            source = str(path) if path.is_file() else weights
            yolo = YOLO(source)
            digest = file_digest(Path(str(yolo.ckpt_path))) if getattr(yolo, "ckpt_path", None) else weights
    except Exception as err:  # ultralytics raises ConnectionError, FileNotFoundError, ...
        raise DetectorError(f"cannot load detector weights {weights!r} (model {model!r}): {err}") from None
    if yolo.task != "detect":
        raise DetectorError(f"{weights!r} is a {yolo.task!r} model, not a detector")
    backend = AutoBackend(model=yolo.model, device=dev, fp16=dev.type == "cuda", fuse=True, verbose=False)
    backend.eval()
    stride = int(max(backend.stride)) if isinstance(backend.stride, list | tuple) else int(backend.stride)
    if imgsz % stride:
        raise DetectorError(f"image size {imgsz} is not a multiple of the model's stride {stride}")
    return Detector(
        backend=backend,
        names=dict(backend.names),
        imgsz=imgsz,
        device=dev,
        digest=digest,
        _letterbox=LetterBox(imgsz, auto=False, stride=stride),
    )

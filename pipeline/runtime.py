"""Where the work runs: the device a `device` setting names, the autocast policy, and an import of
ultralytics that leaves the thread settings alone.

Neither changes what a stage computes beyond float rounding, and neither is a hashed param.
Mixed precision is used on CUDA only: bf16 autocast is fast on some CPUs and slow on others.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Literal

import torch

from pipeline.errors import InputError

Precision = Literal["auto", "off", "bf16", "fp16"]


def pick_device(name: str = "auto") -> torch.device:
    """The device a setting names: auto (the GPU when torch sees one, else the CPU), cpu, cuda or
    cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training under a precision setting, None for full float32.
    auto: bf16 on a GPU that has it, else fp16; float32 on the CPU."""
    if precision == "off" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def inference_dtype(device: torch.device) -> torch.dtype | None:
    """Inference (detect, embed, evaluate): float16 on CUDA, float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def import_ultralytics() -> ModuleType:
    """ultralytics, imported without its side effect on the environment.

    On import, ultralytics sets OMP_NUM_THREADS=1 when it is unset. Every process started
    afterwards (DataLoader workers, decode pools, a `dvc repro` run from the same shell or test
    session) then runs torch on one thread: slower, and with other float rounding, so that the
    same stage gave other bytes depending on what the parent process had imported. Every import
    of ultralytics in the project goes through here first; the user's own setting is kept."""
    had = "OMP_NUM_THREADS" in os.environ
    import ultralytics

    if not had:
        os.environ.pop("OMP_NUM_THREADS", None)
    return ultralytics

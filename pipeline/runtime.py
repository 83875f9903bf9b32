"""Where the work runs: the device a `device` setting names, the autocast policy, and an import of
ultralytics that leaves the thread settings alone.

Neither changes what a stage computes beyond float rounding, and neither is a hashed param.
Mixed precision is used on CUDA only: bf16 autocast is fast on some CPUs and slow on others.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Literal

import torch

from pipeline.errors import InputError

Precision = Literal["auto", "off", "bf16", "fp16"]


# The oldest NVIDIA Linux driver each CUDA major version runs on (NVIDIA's compatibility table).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def pick_device(name: str = "auto", quiet: bool = False) -> torch.device:
    """The device a setting names: auto (the GPU when torch sees one, else the CPU), cpu, cuda or
    cuda:N. Says on stderr which device it picked and why, so that a stage that will run on the
    CPU says so when it starts, not hours later. `cuda` without a usable GPU is an error that
    names the cause (a CPU-only torch, no driver, a driver too old for this torch's CUDA)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        why = "" if device.type == "cuda" else f": {gpu_problem()}"
    else:
        device = torch.device(name)
        why = ""
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but {gpu_problem()}")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    if not quiet:
        print(f"device: {device} (asked: {name}){why}", file=sys.stderr)
    return device


def nvidia_driver() -> str | None:
    """The NVIDIA driver version, from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def gpu_problem() -> str:
    """Why torch sees no usable GPU, in words, with what to do (see docs/gpus.md)."""
    built = torch.version.cuda
    if built is None:
        return f"torch {torch.__version__} is a CPU-only build: install a CUDA build (docs/gpus.md)"
    driver = nvidia_driver()
    if driver is None:
        build = f"torch {torch.__version__} is built for CUDA {built}"
        return f"torch sees no CUDA device ({build}; no NVIDIA driver found)"
    need = MIN_DRIVER.get(int(built.split(".")[0]))
    if need is not None and _version(driver) < _version(need):
        return (
            f"torch {torch.__version__} is built for CUDA {built}, which needs NVIDIA driver {need} or "
            f"newer, and this machine's driver is {driver}: update the driver or install a torch build "
            "for an older CUDA (docs/gpus.md)"
        )
    return f"torch sees no CUDA device (torch built for CUDA {built}, NVIDIA driver {driver})"


def describe() -> dict:
    """What `dclip doctor` prints about torch and the GPUs."""
    gpus = (
        [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
        if torch.cuda.is_available()
        else []
    )
    return {
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "nvidia_driver": nvidia_driver(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "auto_picks": str(pick_device("auto", quiet=True)),
        "why_not_cuda": None if torch.cuda.is_available() else gpu_problem(),
        "cpu_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


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

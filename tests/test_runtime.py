"""pipeline.runtime: device choice, autocast, and importing ultralytics without changing threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.errors import InputError
from pipeline.runtime import amp_dtype, inference_dtype, pick_device


def omp_after(code: str, **env: str) -> str:
    """OMP_NUM_THREADS as a fresh Python process sees it after running `code`."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    script = f"import os\n{code}\nprint(os.environ.get('OMP_NUM_THREADS'))"
    out = subprocess.run([sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_importing_ultralytics_through_the_guard_leaves_the_thread_setting_alone():
    # What the guard is for: ultralytics itself sets OMP_NUM_THREADS=1, which every process
    # started afterwards inherits (a stage then ran on one thread, with other float rounding).
    assert omp_after("import ultralytics") == "1"
    guarded = "from pipeline.runtime import import_ultralytics\nimport_ultralytics()\nimport ultralytics"
    assert omp_after(guarded) == "None"
    assert omp_after(guarded, OMP_NUM_THREADS="3") == "3"  # the user's own setting is kept
    assert omp_after("from pipeline.config import load_params\nload_params('params.yaml')") == "None"


def test_device_choice_and_precision_on_this_machine():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
        with pytest.raises(InputError):
            pick_device("cuda")
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and inference_dtype(cpu) is None

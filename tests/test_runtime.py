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


def test_the_device_is_said_when_it_is_picked(capsys):
    pick_device("cpu")
    assert capsys.readouterr().err == "device: cpu (asked: cpu)\n"
    pick_device("cpu", quiet=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "cuda, driver, expected",
    [
        (None, None, "torch 2.9.9 is a CPU-only build: install a CUDA build (docs/gpus.md)"),
        (
            "13.0",
            None,
            "torch sees no CUDA device (torch 2.9.9 is built for CUDA 13.0; no NVIDIA driver found)",
        ),
        (
            "13.0",
            "535.104.05",
            "torch 2.9.9 is built for CUDA 13.0, which needs NVIDIA driver 580.65.06 or newer, and this "
            "machine's driver is 535.104.05: update the driver or install a torch build for an older CUDA",
        ),
        (
            "12.8",
            "550.54.15",
            "torch sees no CUDA device (torch built for CUDA 12.8, NVIDIA driver 550.54.15)",
        ),
    ],
)
def test_cuda_without_a_usable_gpu_names_the_cause(monkeypatch, cuda, driver, expected):
    # Before: "torch sees no CUDA device", and device: auto ran on the CPU without a word.
    from pipeline import runtime

    monkeypatch.setattr(torch, "__version__", "2.9.9")
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(runtime, "nvidia_driver", lambda: driver)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.gpu_problem().startswith(expected)
    with pytest.raises(InputError, match="^device 'cuda' asked for, but "):
        pick_device("cuda")


def test_dclip_doctor_says_what_auto_picks_and_why():
    import json

    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["torch"] == torch.__version__ and got["cpu_threads"] == torch.get_num_threads()
    assert got["auto_picks"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (got["why_not_cuda"] is None) == torch.cuda.is_available()
    assert got["disk_free_gib"] > 0
    # The repository's own params (run from its folder): the demo's run, sized.
    need = got["disk_needed"]
    assert need["pairs"] == 12500 + 5000 + 1000 and need["fits"] in (True, False)
    assert need["need_gib"] == pytest.approx(
        need["curated_gib"] + need["embed_cache_gib"] + need["scratch_gib"], abs=0.02
    )


def test_disk_estimate_exact_on_small_numbers():
    from pipeline.disk import estimate

    need = estimate(pairs=10, image_size=100, width=4, context=3, max_regions=2)
    # Images: 100 × 133.3 px × 0.5 B = 6,666.7 B each. Vectors per pair: 3 tokens + whole image
    # and 2 regions + image and caption = 8, of 4 float16 values, written twice: 128 B.
    assert (need.curated_bytes, need.embed_bytes, need.scratch_bytes) == (66667, 1280, 1280)
    assert need.total_bytes == 69227 and need.with_dvc_cache() == 69227 + 66667 + 1280
    with pytest.raises(ValueError):
        estimate(pairs=-1, image_size=100, width=4, context=3, max_regions=2)


def test_doctor_names_a_bad_params_file_and_still_reports(tmp_path):
    from stages.doctor import report

    (tmp_path / "params.yaml").write_text("curate:\n  image_size: 0\n")
    got = report(tmp_path)
    assert got["disk_needed"]["error"].startswith(f"{tmp_path / 'params.yaml'}: 1 invalid value")
    assert got["torch"] == torch.__version__

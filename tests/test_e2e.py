"""End to end: the real `dvc repro` on the tiny demo world, in a fresh git repository.

Later stages extend this test as they join the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from .helpers import CURATE_MIX, REPO, TINY_WORLD, restore, sh

pytestmark = pytest.mark.e2e


def test_repro_runs_every_stage_then_nothing(reproduced):
    repo, first = reproduced.root, reproduced.first
    assert "Running stage 'demo/dvc.yaml:world'" in first
    assert "Running stage 'curate'" in first
    assert first.index("demo/dvc.yaml:world") < first.index("Running stage 'curate'")
    # The base models as files, before anything loads them; the demo's are copies of its weights.
    assert first.index("Running stage 'weights'") < first.index("Running stage 'detect'")
    assert (repo / "data" / "weights" / "clip.pt").read_bytes() == (
        repo / "demo" / "weights" / "clip-DCLIP-Demo-RN64.pt"
    ).read_bytes()
    world = json.loads((repo / "demo" / "raw" / "world.json").read_text())
    assert world["coco"]["images"] == TINY_WORLD["coco"]["train2014"] + TINY_WORLD["coco"]["val2014"]
    assert (repo / "demo" / "dvc.lock").is_file() and (repo / "dvc.lock").is_file()
    metrics = json.loads((repo / "metrics" / "info" / "curate.json").read_text())
    assert {s: metrics["train"][s]["kept_pairs"] for s in CURATE_MIX} == CURATE_MIX
    assert (repo / "data" / "curated" / "train.parquet").is_file()
    # detect: a row per training sample (36 pairs in shards of 8), after curate.
    assert first.index("Running stage 'curate'") < first.index("Running stage 'detect'")
    detect = json.loads((repo / "metrics" / "info" / "detect.json").read_text())
    pairs = sum(CURATE_MIX.values())
    assert (detect["shards"], detect["images"], detect["rejects"]) == (-(-pairs // 8), pairs, 0)
    assert detect["regions"] >= detect["images"] - detect["images_without_detections"] > 0
    assert pq.read_table(repo / "data" / "regions.parquet").num_rows == detect["images"]
    # embed: every pair, each image encoded once, after detect; the whole image is region 0 of
    # each; a teacher shard per curated shard.
    assert first.index("Running stage 'detect'") < first.index("Running stage 'embed'")
    embed = json.loads((repo / "metrics" / "info" / "embed.json").read_text())
    train = pq.read_table(repo / "data" / "curated" / "train.parquet").to_pylist()
    images = {r["image"] for r in train}
    assert len(images) == 4 + 2 + 6
    assert (embed["pairs"], embed["images"], embed["rejects"]) == (pairs, len(images), 0)
    boxes = {r["key"]: r["regions"] for r in pq.read_table(repo / "data" / "regions.parquet").to_pylist()}
    first_pair = {}
    for r in train:
        first_pair.setdefault(r["image"], r["key"])
    assert embed["regions"] == len(images) + sum(boxes[k] for k in first_pair.values())
    teacher = sorted(p.name for p in (repo / "data" / "embeddings" / "teacher").glob("*.tar"))
    assert teacher == sorted(p.name for p in (repo / "data" / "curated" / "train").glob("*.tar"))
    # evaluate@base after curate (it needs only the evaluation sets), then the report.
    assert first.index("Running stage 'curate'") < first.index("Running stage 'evaluate@base'")
    assert first.index("Running stage 'evaluate@base'") < first.index("Running stage 'report'")
    base = json.loads((repo / "metrics" / "base.json").read_text())
    base_info = json.loads((repo / "metrics" / "info" / "base.json").read_text())
    assert base_info["retrieval"]["coco"]["images"] == TINY_WORLD["coco"]["karpathy_test"]
    assert set(base["retrieval"]["coco"]["text_to_image"]) == {
        "R@1",
        "R@5",
        "R@10",
        "mAP",
        "MRR",
        "clip_benchmark",
    }
    assert set(base["zeroshot"]) == {"imagenet", "cifar10", "cifar100"}
    assert "metrics/base.json" in sh(["dvc", "metrics", "show"], repo)
    assert (repo / "metrics" / "recall" / "base.csv").is_file()
    assert "| COCO test (15 images" in (repo / "metrics" / "report.md").read_text()

    # train_teacher after embed: targets for every pair; distill after it; the student is
    # evaluated and reported beside the base, the compositional probe included.
    assert first.index("Running stage 'embed'") < first.index("Running stage 'train_teacher'")
    assert first.index("Running stage 'train_teacher'") < first.index("Running stage 'distill'")
    assert first.index("Running stage 'distill'") < first.index("Running stage 'evaluate@student'")
    teacher_metrics = json.loads((repo / "metrics" / "teacher.json").read_text())
    teacher_info = json.loads((repo / "metrics" / "info" / "teacher.json").read_text())
    assert teacher_info["targets"] == embed["pairs"] and len(teacher_metrics["epochs"]) == 2
    targets = pq.read_table(repo / "data" / "teacher_targets.parquet")
    captions = pq.read_table(repo / "data" / "embeddings" / "captions.parquet")
    assert sorted(targets.column("key").to_pylist()) == sorted(captions.column("key").to_pylist())
    distilled = json.loads((repo / "metrics" / "info" / "distill.json").read_text())
    assert distilled["text_tower_unchanged"] and distilled["pairs"] == embed["pairs"]
    assert distilled["images"] == embed["images"] and distilled["teacher_target"] == "paper"
    # The teacher is measured on captions its targets were not conditioned on, never on its own.
    assert {"val_unseen_t2i_R@1", "val_base_t2i_R@1"} <= set(teacher_metrics["epochs"][0])
    # Every query of every evaluation set, val included, for the study's intervals.
    queries = pq.read_table(repo / "metrics" / "queries" / "student.parquet")
    assert {"coco_val", "flickr30k_val", "coco", "imagenet", "sugarcrepe"} <= set(
        queries.column("dataset").to_pylist()
    )
    assert (repo / "models" / "student.pt").is_file()
    assert (repo / "metrics" / "distill" / "plots" / "metrics").is_dir()
    student = json.loads((repo / "metrics" / "student.json").read_text())
    assert set(student["probe"]["sugarcrepe"]["accuracy"]) >= {"swap_att", "replace_rel", "mean"}
    report = (repo / "metrics" / "report.md").read_text()
    assert "Δ student" in report and "## Compositional probe" in report

    # export after the student's evaluation: the student as an open_clip folder, the project's
    # model artifact (its path interpolated from params).
    assert first.index("Running stage 'evaluate@student'") < first.index("Running stage 'export'")
    exported = repo / "models" / "student-open_clip"
    assert {p.name for p in exported.iterdir()} == {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "README.md",
    }
    assert "| coco text→image R@1 |" in (exported / "README.md").read_text()
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        artifact = dvc_repo.artifacts.read()["dvc.yaml"]["dclip-student"]
    assert (artifact.path, artifact.type) == ("models/student-open_clip", "model")

    # `dvc plots show`: the teacher's and the student's training curves and the recall@k curves.
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], repo))["data"]
    assert {
        "COCO recall@k",
        "Flickr30k recall@k",
        "metrics/teacher/plots/metrics/val_loss.tsv",
        "metrics/teacher/plots/metrics/val_unseen_t2i_R@1.tsv",
        "metrics/distill/plots/metrics/total.tsv",
        "metrics/distill/plots/metrics/teacher_cos.tsv",
    } <= set(plots)

    second = sh(["dvc", "repro"], repo)
    assert "Running stage" not in second
    assert "didn't change, skipping" in second
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)


def test_a_params_edit_reruns_the_world_and_restores_from_cache(reproduced):
    repo = reproduced.root
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["world"]["seed"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'demo/dvc.yaml:world'" in sh(["dvc", "repro", "demo/dvc.yaml"], repo)
    # Back to the committed params: DVC's run-cache restores the outputs without running.
    restore(repo)


def test_dvc_metrics_show_lists_figures_only(reproduced):
    """Before: about 400 columns, most of them counts, sizes, chance levels, hashes and timings.
    Now the metrics files hold figures; the rest is each stage's info, a cached output."""
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], reproduced.root))
    ((_, workspace),) = shown.items()
    files = workspace["data"]
    assert set(files) == {f"metrics/{name}.json" for name in ("teacher", "distill", "base", "student")}

    def leaves(node, path=()):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, (*path, k))
        elif not isinstance(node, list):  # a list (a per-epoch history) is no column
            yield path

    columns = [(f, *p) for f, d in files.items() for p in leaves(d["data"])]
    info = {"images", "captions", "classes", "templates", "items", "chance", "text_cosine", "device"}
    info |= {"pairs", "targets", "train_seconds", "text_tower_sha256", "steps", "val_images"}
    assert not [c for c in columns if set(c) & info]
    assert len(columns) < 200, len(columns)
    for name in ("curate", "detect", "embed", "teacher", "distill", "base", "student"):
        assert (reproduced.root / "metrics" / "info" / f"{name}.json").is_file(), name


def test_every_plot_names_its_axes():
    # Before: the recall plots' y axis was titled "y" and the teacher's x axis "step" for epochs.
    from .helpers import REPO

    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for plot in doc["plots"]:
        ((name, props),) = plot.items()
        assert props.get("x_label") and props.get("y_label"), name
    for stage, body in doc["stages"].items():
        for out in body.get("plots", []):
            ((path, props),) = out.items()
            assert props.get("x_label") not in (None, "step"), f"{stage}: {path}"


def test_the_disk_estimate_bounds_what_the_tiny_run_wrote(reproduced):
    """`dclip doctor`'s estimate is an upper bound of what curate and embed write, and not a wild
    one (the tiny world's images are smaller than the stored size, its captions far shorter than
    the context)."""
    from stages.doctor import disk_need

    repo = reproduced.root
    need = disk_need(repo / "params.yaml")
    written = {
        "curated": sum(p.stat().st_size for p in (repo / "data" / "curated" / "train").glob("*.tar")),
        "embed_cache": sum(
            p.stat().st_size for p in (repo / "data" / "embeddings").rglob("*") if p.is_file()
        ),
    }
    assert need["pairs"] == sum(CURATE_MIX.values())
    for key, actual in written.items():
        bound = need["bytes"][key]
        assert actual <= bound <= 20 * actual, (key, actual, bound)


def test_dclip_repro_checks_first_then_is_dvc_repro(reproduced, tmp_path):
    # A recipe whose raw data is not there: the project names every missing input by its params
    # key, and DVC never starts (its one-path `[Errno 2]` would have hidden the rest).
    shutil.copy(REPO / "configs" / "paper-vit-b32.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    got = subprocess.run(
        ["dclip", "repro", "dvc.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert got.returncode == 2, got.stderr
    assert "raw input(s) not found (the curate stage reads them)" in got.stderr
    assert "  sources.coco.images: data/raw/coco does not exist" in got.stderr
    assert "Running stage" not in got.stdout + got.stderr
    # A project that is whole: exactly dvc repro, its arguments passed on.
    out = sh(["dclip", "repro", "dvc.yaml"], reproduced.root)
    assert "Running stage" not in out and "didn't change, skipping" in out

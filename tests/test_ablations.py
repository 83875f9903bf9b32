"""pipeline.ablations and stages.ablations: the ablations are valid params (applied the way
`dvc exp run -S` applies them), the Table 4 layout is exact on hand-made metrics, and one ablation
runs end to end as a real DVC experiment."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.ablations import (
    ABLATIONS,
    BY_NAME,
    FULL,
    apply_overrides,
    mismatches,
    overrides,
    parse_run_name,
    resolve,
    run_name,
    study_table,
    to_markdown,
)
from pipeline.config import parse_params
from pipeline.evaluate import QUERY_SCHEMA
from stages.ablations import (
    AblationError,
    exp_run_command,
    experiments,
    hydra_value,
    set_param_args,
    workspace_seed,
)

from .helpers import REPO, sh

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


# --- the definitions ------------------------------------------------------------------------------


def test_the_papers_rows_in_order_and_one_extra():
    assert [a.name for a in ABLATIONS if a.paper] == [
        "full",
        "no_yolo",
        "no_bidirectional",
        "no_cross_attention",
        "no_teacher",
    ]
    assert [a.name for a in ABLATIONS if not a.paper] == [
        "no_region_weights",
        "other_captions",
        "regions_only",
        "strong_teacher",
        "context_crops",
    ]
    # Each ablation changes exactly one thing of the full method.
    full = overrides(FULL)
    for a in ABLATIONS[1:]:
        changed = {k for k, v in overrides(a.name).items() if full.get(k, object()) != v}
        assert len(changed) == 1, a.name
    assert resolve(["no_teacher", "full", "no_teacher"]) == [BY_NAME["full"], BY_NAME["no_teacher"]]
    with pytest.raises(ValueError, match="unknown ablation.*nope; known: full, no_yolo"):
        resolve(["nope"])


@pytest.mark.parametrize("name", [a.name for a in ABLATIONS])
def test_overrides_are_valid_params_and_dvc_sets_them_the_same(name, tmp_path):
    from dvc.utils.hydra import apply_overrides as dvc_apply

    ours = apply_overrides(PARAMS, overrides(name, seed=2))
    cfg = parse_params(ours, base_dir=REPO)  # validates every section, every key
    for key, value in overrides(name, seed=2).items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value
    assert cfg.teacher.seed == cfg.distill.seed == 2
    assert mismatches(name, ours, seed=2) == []
    assert mismatches(name, ours, seed=0) == ["teacher.seed is 2, not 0", "distill.seed is 2, not 0"]
    # `dvc exp run -S` (Hydra's grammar, DVC's YAML writer) gives exactly the same params.
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    dvc_apply(path, [a for a in set_param_args(overrides(name, seed=2)) if a != "-S"])
    assert yaml.safe_load(path.read_text()) == ours
    assert exp_run_command(name, 2)[:6] == ["dvc", "exp", "run", "--temp", "-n", f"{name}-s2"]
    assert exp_run_command(name, 2)[-1] == "dvc.yaml"


def test_run_names_and_the_workspace_s_own_run():
    assert run_name("no_teacher", 3) == "no_teacher-s3"
    assert parse_run_name("no_teacher-s3") == ("no_teacher", 3)
    assert parse_run_name("regions_only-s10") == ("regions_only", 10)
    assert parse_run_name("no_teacher") is None and parse_run_name("mine-s1") is None
    assert parse_run_name("no_teacher-sx") is None
    # The workspace is `full` with its seed when its params are full's; otherwise it is no run.
    assert workspace_seed(apply_overrides(PARAMS, overrides("full", 0))) == 0
    assert workspace_seed(apply_overrides(PARAMS, {"teacher.seed": 1, "distill.seed": 2})) is None
    assert workspace_seed(apply_overrides(PARAMS, {"distill.lambda_cos": 0.0})) is None


def test_overrides_never_add_a_key():
    with pytest.raises(KeyError, match="teacher.atention"):
        apply_overrides(PARAMS, {"teacher.atention": "none"})
    assert PARAMS["teacher"]["attention"] == "bidirectional"  # the input is not touched


@pytest.mark.parametrize(
    "value, text",
    [
        (True, "true"),
        (0.0, "0.0"),
        (None, "null"),
        ("whole_image", "whole_image"),
        ("true", "'true'"),
        ("it's a b", "'it\\'s a b'"),
        ("3rd", "'3rd'"),
    ],
)
def test_hydra_values_read_back_as_the_same_yaml(value, text, tmp_path):
    from dvc.utils.hydra import apply_overrides as dvc_apply

    assert hydra_value(value) == text
    path = tmp_path / "p.yaml"
    path.write_text("a:\n  b: 1\n")
    dvc_apply(path, [f"a.b={hydra_value(value)}"])
    assert yaml.safe_load(path.read_text()) == {"a": {"b": value}}


def test_mismatches_name_what_is_not_the_variant():
    workspace = apply_overrides(PARAMS, {"teacher.attention": "none", "distill.lambda_cos": 0.0})
    assert mismatches("full", workspace) == [
        "teacher.attention is 'none', not 'bidirectional'",
        "distill.lambda_cos is 0.0, not 1.0",
    ]
    assert mismatches("no_teacher", apply_overrides(PARAMS, overrides("no_teacher"))) == []
    assert mismatches("no_region_weights", apply_overrides(PARAMS, {"teacher.region_weights": 0})) == [
        "teacher.region_weights is 0, not False"
    ]


# --- the study table ------------------------------------------------------------------------------


def queries(**per_task) -> pa.Table:
    """A queries table: per (dataset, task) the places of its queries (probe: (category, place))."""
    rows = {"dataset": [], "task": [], "category": [], "query": [], "place": [], "top": []}
    for key, places in per_task.items():
        dataset, task = key.split("__")
        for q, place in enumerate(places):
            category, place = place if isinstance(place, tuple) else (None, place)
            for col, v in zip(rows, (dataset, task, category, q, place, None)):
                rows[col].append(v)
    return pa.table(rows, schema=QUERY_SCHEMA)


def evaluation(t2i, zero, probe=None):
    extra = {"sugarcrepe__probe": probe} if probe else {}
    return queries(coco_val__text_to_image=t2i, coco__text_to_image=t2i, imagenet__zero_shot=zero, **extra)


BASE = evaluation([0, 1, 1, 0, 3, 1], [0, 0, 0, 1], [("swap_att", 0), ("swap_att", 1), ("add_obj", 0)])
FULL_RUNS = {
    0: evaluation([0, 0, 1, 0, 0, 1], [0, 0, 1, 1], [("swap_att", 0), ("swap_att", 0), ("add_obj", 0)]),
    1: evaluation([0, 0, 0, 0, 0, 1], [0, 0, 0, 1], [("swap_att", 0), ("swap_att", 1), ("add_obj", 0)]),
}


def test_study_figures_exact_over_seeds_with_missing_variants():
    t = study_table(
        {"base": {0: BASE}, "full": FULL_RUNS, "no_teacher": {0: FULL_RUNS[1]}},
        ["full", "no_yolo", "no_teacher"],
        baseline="0123456789abcdef",
        seeds_asked=3,
        replicates=300,
    )
    rows = {r["name"]: r for r in t["rows"]}
    assert [r["name"] for r in t["rows"]] == ["base", "full", "no_yolo", "no_teacher"]
    assert [r["status"] for r in t["rows"]] == ["present", "present", "missing", "present"]
    assert rows["full"]["seeds"] == [0, 1] and rows["base"]["seeds"] == [0]
    coco = rows["full"]["figures"]["coco_val_t2i_R@1"]
    assert coco["seeds"] == [4 / 6, 5 / 6] and coco["mean"] == pytest.approx(0.75)
    assert rows["base"]["figures"]["coco_val_t2i_R@1"]["mean"] == 2 / 6
    assert coco["differences"]["base"]["mean"] == pytest.approx(0.75 - 2 / 6)
    # The probe: the mean over categories of each category's accuracy.
    assert rows["base"]["figures"]["sugarcrepe_mean"]["mean"] == pytest.approx((0.5 + 1) / 2)
    assert rows["full"]["figures"]["sugarcrepe_mean"]["seeds"] == pytest.approx([1.0, 0.75])
    # Retention: top-1 ÷ the base's (0.75), per seed then averaged: (0.5 + 0.75) / 2 / 0.75.
    assert rows["full"]["figures"]["zeroshot_top1_retention"]["mean"] == pytest.approx(0.625 / 0.75)
    # Differences from base and from full; full has none from itself.
    assert set(rows["no_teacher"]["figures"]["coco_t2i_R@1"]["differences"]) == {"base", "full"}
    assert "full" not in rows["full"]["figures"]["coco_t2i_R@1"]["differences"]
    assert rows["base"]["figures"]["coco_t2i_R@5"]["mean"] == 1.0  # places 0-3: all in the top 5
    # What the runs hold no queries for (no image→text, no Flickr30k, no CIFAR).
    assert t["figures_without_values"] == [
        "coco_val_i2t_R@1",
        "flickr30k_val_t2i_R@1",
        "flickr30k_val_i2t_R@1",
        "coco_i2t_R@1",
        "coco_i2t_R@5",
        "flickr30k_t2i_R@1",
        "flickr30k_t2i_R@5",
        "flickr30k_i2t_R@1",
        "flickr30k_i2t_R@5",
        "cifar10_top1",
        "cifar100_top1",
    ]
    assert t["missing"] == [
        {
            "name": "no_yolo",
            "label": "w/o YOLO regions (whole image)",
            "command": "dclip ablations run no_yolo --seeds 3",
        }
    ]
    json.dumps(t)  # JSON-ready


def test_every_variant_by_default_and_warnings_per_seed():
    workspace = apply_overrides(
        PARAMS, {"teacher.regions": "whole_image", "teacher.seed": 1, "distill.seed": 1}
    )
    t = study_table({"full": {1: FULL_RUNS[1]}}, params={"full": {1: workspace}}, replicates=100)
    assert [r["name"] for r in t["rows"]] == ["base", *(a.name for a in ABLATIONS)]
    assert [m["name"] for m in t["missing"]] == ["base", *(a.name for a in ABLATIONS if a.name != "full")]
    assert t["missing"][0] == {"name": "base", "label": "CLIP (base)", "command": "dvc repro evaluate@base"}
    assert t["rows"][1]["warnings"] == ["seed 1: teacher.regions is 'whole_image', not 'yolo'"]
    # No base run: no differences from it, and no retention.
    assert "zeroshot_top1_retention" in t["figures_without_values"]
    assert t["rows"][1]["figures"]["coco_t2i_R@1"]["differences"] == {}


def test_markdown_sections_intervals_and_differences():
    t = study_table(
        {"base": {0: BASE}, "full": FULL_RUNS, "no_teacher": {0: FULL_RUNS[1]}},
        ["full", "no_yolo", "no_teacher"],
        baseline="0123456789abcdef",
        replicates=300,
    )
    md = to_markdown(t)
    lines = md.splitlines()
    assert lines[0] == "# The study: DCLIP's variants over seeds, with intervals"
    assert "Experiments of baseline commit `0123456`." in lines[2]
    assert "## Validation (Karpathy val: where every choice is made)" in lines
    assert "## Test (Karpathy test: the readout)" in lines
    row = next(line for line in lines if line.startswith("| DCLIP (full), 2 seeds |"))
    lo, hi = t["rows"][1]["figures"]["coco_val_t2i_R@1"]["interval"]
    sd = 100 * float(np.std([4 / 6, 5 / 6], ddof=1))
    assert row.startswith(f"| DCLIP (full), 2 seeds | 75.0 [{100 * lo:.1f}, {100 * hi:.1f}] ±{sd:.1f} |")
    assert "Difference from the base CLIP, percentage points:" in lines
    assert "Difference from `full`, percentage points:" in lines
    assert any(line.startswith("| w/o teacher (λ_cos = 0) (`no_teacher`), 1 seed | ") for line in lines)
    assert "- `no_yolo` (w/o YOLO regions (whole image)): `dclip ablations run no_yolo --seeds 1`" in lines
    extra = to_markdown(study_table({"regions_only": {0: BASE}}, ["regions_only"], replicates=50))
    assert "| teacher target: regions only, no caption † (`regions_only`), 1 seed |" in extra


def test_experiments_from_exp_show_json():
    def state(rev, name=None, r1=None):
        data = {"metrics": {"metrics/student.json": {"data": {"r": r1}}}, "params": {}} if r1 else None
        return {"rev": rev, "name": name, "data": data, "error": None, "experiments": None}

    shown = [
        state("workspace", r1=0.5),
        {
            **state("abc123", "main", r1=0.5),
            "experiments": [
                {"revs": [state("e1", "no_teacher", r1=0.4)], "executor": None, "name": "no_teacher"},
                {
                    "revs": [state("e2", "no_yolo", r1=0.3)],
                    "executor": {"state": "failed"},
                    "name": "no_yolo",
                },
                {"revs": [state("e3", "no_bidirectional")], "executor": {"state": "queued"}, "name": None},
                {"revs": [state("e4", "mine", r1=0.2)], "executor": {"state": "success"}, "name": "mine"},
            ],
        },
    ]
    workspace, baseline, found = experiments(shown)
    assert workspace["rev"] == "workspace" and baseline == "abc123"
    assert sorted(found) == ["mine", "no_teacher"]
    assert found["no_teacher"]["rev"] == "e1"


# --- end to end: one ablation as a real DVC experiment ----------------------------------------------


@pytest.mark.e2e
def test_no_teacher_runs_as_a_dvc_experiment_and_reports(reproduced):
    root = reproduced.root
    git_before = sh(["git", "status", "--porcelain"], root)
    out_files = [root / "metrics" / "ablations.md", root / "metrics" / "ablations.json"]
    kept = {p: p.read_bytes() if p.is_file() else None for p in out_files}
    try:
        out = sh(["dclip", "ablations", "run", "no_teacher", "--seeds", "1"], root)
        # Only what λ_cos (and the seed, the workspace's own) feeds re-ran: distill onwards.
        for stage in ("distill", "evaluate@student", "report", "export"):
            assert f"Running stage '{stage}'" in out, out
        for stage in ("curate", "detect", "embed", "train_teacher", "evaluate@base"):
            assert f"Running stage '{stage}'" not in out, out
        shown = sh(
            ["dvc", "exp", "show", "--csv"], root
        ).splitlines()  # the text table is cut to the terminal
        assert [line.split(",")[0] for line in shown[1:]] == ["", "", "no_teacher-s0"]  # workspace, HEAD, it

        report = sh(["dclip", "report", "--ablations", "--seeds", "1"], root)
        t = json.loads(out_files[1].read_text())
        rows = {r["name"]: r for r in t["rows"]}
        assert [rows[n]["status"] for n in ("base", "full", "no_teacher")] == ["present"] * 3
        assert rows["full"]["seeds"] == [0] and rows["no_teacher"]["seeds"] == [0]
        assert all(not r["warnings"] for r in t["rows"])
        assert {m["name"] for m in t["missing"]} == {a.name for a in ABLATIONS} - {"full", "no_teacher"}
        # The row is the experiment's own evaluation, read here straight from its git commit.
        ref = next(
            r
            for r in sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).split()
            if r.endswith("/no_teacher-s0")
        )
        exp_params = yaml.safe_load(sh(["git", "show", f"{ref}:params.yaml"], root))
        assert exp_params["distill"]["lambda_cos"] == 0.0 and exp_params["distill"]["seed"] == 0
        exp = json.loads(sh(["git", "show", f"{ref}:metrics/student.json"], root))
        workspace = json.loads((root / "metrics" / "student.json").read_text())
        for name, source in (("no_teacher", exp), ("full", workspace)):
            for figure, path in (
                ("coco_t2i_R@1", ("retrieval", "coco", "text_to_image", "R@1")),
                ("coco_val_i2t_R@1", ("retrieval", "coco_val", "image_to_text", "R@1")),
                ("imagenet_top1", ("zeroshot", "imagenet", "top1")),
            ):
                value = source
                for part in path:
                    value = value[part]
                assert rows[name]["figures"][figure]["mean"] == pytest.approx(value, abs=5e-5)
        assert "differences" in rows["no_teacher"]["figures"]["coco_t2i_R@1"]
        assert set(rows["no_teacher"]["figures"]["coco_t2i_R@1"]["differences"]) == {"base", "full"}
        md = out_files[0].read_text()
        assert "| w/o teacher (λ_cos = 0) (`no_teacher`), 1 seed |" in md
        assert "- `no_yolo` (w/o YOLO regions (whole image)): `dclip ablations run no_yolo --seeds 1`" in md
        assert md in report
        # The same study read from the baseline commit itself (the workspace is that commit).
        sh(["dclip", "report", "--ablations", "--seeds", "1", "--rev", "HEAD"], root)
        assert json.loads(out_files[1].read_text())["rows"] == t["rows"]

        # Already made for this commit: kept, nothing run.
        again = sh(["dclip", "ablations", "run", "no_teacher", "--seeds", "1", "--skip-existing"], root)
        assert "no_teacher-s0: already run for this commit; skipped" in again and "Running stage" not in again
    finally:
        for path in out_files:  # as they were: the project keeps the demo's study in git
            if kept[path] is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(kept[path])
        refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).split()
        made = [r for r in refs if r.endswith("/no_teacher-s0")]
        if made:
            sh(["dvc", "exp", "remove", *made], root)
    # The workspace was never touched.
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], root)
    assert sh(["git", "status", "--porcelain"], root) == git_before


# --- raw inputs an experiment's copy would lack ------------------------------------------------------


def test_untracked_raw_inputs_are_named_before_any_experiment_runs(tmp_path):
    """`dvc exp run --temp` copies only what git and DVC track: an untracked raw folder failed
    hours into a paper study with `[Errno 2] …/.dvc/tmp/exps/…/data/raw/…`."""
    from stages.ablations import check_tracked, untracked_inputs

    root = tmp_path / "repo"
    root.mkdir()
    sh(["git", "init", "-q"], root)
    sh(["dvc", "init", "-q"], root)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # Every source under data/raw (sources.root), as on a paper run.
    raw["sources"] = yaml.safe_load(yaml.safe_dump(raw["sources"]).replace("demo/raw", "data/raw"))
    raw["sources"]["coco"]["train_annotations"] = "data/raw/coco/captions.json"
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    for rel in (
        "data/raw/coco/captions.json",
        "data/raw/karpathy/dataset_coco.json",
        "data/raw/cc/00000.tar",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")
    sh(["dvc", "add", "-q", "data/raw/coco"], root)  # tracked by DVC
    sh(["git", "add", "data/raw/karpathy"], root)  # tracked by git (small files)
    # data/raw/cc: on disk only. The other sources do not exist: params check's job.
    assert untracked_inputs(root) == [("sources.cc.shards", root / "data/raw/cc")]
    with pytest.raises(AblationError) as err:
        check_tracked(root)
    message = str(err.value)
    assert "1 raw input(s) are neither DVC-tracked nor in git" in message
    assert "  sources.cc.shards: " in message and "`dvc add data/raw/cc`" in message
    assert "dvc config cache.type reflink,hardlink,symlink" in message
    sh(["dvc", "add", "-q", "data/raw/cc"], root)
    assert untracked_inputs(root) == []
    check_tracked(root)

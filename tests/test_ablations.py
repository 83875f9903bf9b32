"""pipeline.ablations and stages.ablations: the ablations are valid params (applied the way
`dvc exp run -S` applies them), the Table 4 layout is exact on hand-made metrics, and one ablation
runs end to end as a real DVC experiment."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipeline.ablations import (
    ABLATIONS,
    BY_NAME,
    FULL,
    apply_overrides,
    mismatches,
    overrides,
    resolve,
    table,
    to_markdown,
)
from pipeline.config import parse_params
from stages.ablations import exp_run_command, experiments, hydra_value, set_param_args

from .conftest import REPO, sh

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
    assert [a.name for a in ABLATIONS if not a.paper] == ["no_region_weights"]
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

    ours = apply_overrides(PARAMS, overrides(name))
    cfg = parse_params(ours, base_dir=REPO)  # validates every section, every key
    for key, value in overrides(name).items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value
    assert mismatches(name, ours) == []
    # `dvc exp run -S` (Hydra's grammar, DVC's YAML writer) gives exactly the same params.
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    dvc_apply(path, [a for a in set_param_args(overrides(name)) if a != "-S"])
    assert yaml.safe_load(path.read_text()) == ours
    assert exp_run_command(name)[:6] == ["dvc", "exp", "run", "--temp", "-n", name]
    assert exp_run_command(name)[-1] == "dvc.yaml"


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
        "distill.lambda_cos is 0.0: no teacher term, so this is no 'full' run",
    ]
    assert mismatches("no_teacher", apply_overrides(PARAMS, overrides("no_teacher"))) == []
    assert mismatches("no_region_weights", apply_overrides(PARAMS, {"teacher.region_weights": 0})) == [
        "teacher.region_weights is 0, not False"
    ]


# --- the table ------------------------------------------------------------------------------------


def metrics(t2i, i2t, flickr=None, imagenet=None, cifar10=None, sugarcrepe=None) -> dict:
    out = {
        "retrieval": {
            "coco": {
                "images": 5,
                "captions": 25,
                "text_to_image": {"R@1": t2i[0], "R@5": t2i[1], "R@10": 0.9},
                "image_to_text": {"R@1": i2t[0], "R@5": i2t[1], "R@10": 0.9},
            }
        },
        "zeroshot": {},
    }
    if flickr:
        out["retrieval"]["flickr30k"] = {
            "text_to_image": {"R@1": flickr[0], "R@5": flickr[1]},
            "image_to_text": {"R@1": flickr[2], "R@5": flickr[3]},
        }
    for name, top1 in (("imagenet", imagenet), ("cifar10", cifar10)):
        if top1 is not None:
            out["zeroshot"][name] = {"images": 10, "classes": 2, "top1": top1, "top5": 1.0}
    if sugarcrepe is not None:
        out["probe"] = {"sugarcrepe": {"accuracy": {"swap_att": 0.1, "mean": sugarcrepe}}}
    return out


RESULTS = {
    "base": metrics((0.1, 0.3), (0.2, 0.4), (0.3, 0.5, 0.4, 0.6), imagenet=0.5, cifar10=0.8, sugarcrepe=0.6),
    "full": metrics(
        (0.2, 0.5), (0.25, 0.45), (0.4, 0.6, 0.5, 0.7), imagenet=0.45, cifar10=0.8, sugarcrepe=0.7
    ),
    "no_teacher": metrics((0.15, 0.4), (0.2, 0.4), imagenet=0.4, cifar10=0.4),  # no Flickr, no probe
    "no_yolo": None,  # asked for and not found
}
KEYS = [
    "coco_text_to_image_R@1",
    "coco_text_to_image_R@5",
    "coco_image_to_text_R@1",
    "coco_image_to_text_R@5",
    "flickr30k_text_to_image_R@1",
    "flickr30k_text_to_image_R@5",
    "flickr30k_image_to_text_R@1",
    "flickr30k_image_to_text_R@5",
    "imagenet_top1",
    "cifar10_top1",
    "sugarcrepe_mean",
    "zeroshot_top1_retention",
]


def test_table_cells_exact_with_missing_variants():
    t = table(RESULTS, ["full", "no_yolo", "no_teacher"], baseline="0123456789abcdef")
    assert [c["key"] for c in t["columns"]] == KEYS
    assert t["columns_without_values"] == ["cifar100_top1"]  # nobody evaluated CIFAR-100
    assert [r["name"] for r in t["rows"]] == ["base", "full", "no_yolo", "no_teacher"]
    cells = {r["name"]: [r["cells"][k] for k in KEYS] for r in t["rows"]}
    assert cells["base"] == [0.1, 0.3, 0.2, 0.4, 0.3, 0.5, 0.4, 0.6, 0.5, 0.8, 0.6, 1.0]
    # retention: mean(0.45 / 0.5, 0.8 / 0.8) = 0.95
    assert cells["full"] == [0.2, 0.5, 0.25, 0.45, 0.4, 0.6, 0.5, 0.7, 0.45, 0.8, 0.7, 0.95]
    assert cells["no_yolo"] == [None] * 12
    # mean(0.4 / 0.5, 0.4 / 0.8) = 0.65
    assert cells["no_teacher"] == [0.15, 0.4, 0.2, 0.4, None, None, None, None, 0.4, 0.4, None, 0.65]
    assert [r["status"] for r in t["rows"]] == ["present", "present", "missing", "present"]
    assert t["missing"] == [
        {
            "name": "no_yolo",
            "label": "w/o YOLO regions (whole image)",
            "command": "dclip ablations run no_yolo",
        }
    ]
    assert t["rows"][3]["overrides"]["distill.lambda_cos"] == 0.0
    json.dumps(t)  # JSON-ready


def test_every_variant_by_default_and_missing_reference():
    t = table({"no_teacher": RESULTS["no_teacher"]})
    assert [r["name"] for r in t["rows"]] == ["base", *(a.name for a in ABLATIONS)]
    assert [m["name"] for m in t["missing"]] == [
        "base",
        "full",
        "no_yolo",
        "no_bidirectional",
        "no_cross_attention",
        "no_region_weights",
    ]
    assert t["missing"][:2] == [
        {"name": "base", "label": "CLIP (base)", "command": "dvc repro evaluate@base"},
        {"name": "full", "label": "DCLIP (full)", "command": "dvc repro dvc.yaml"},
    ]
    # No reference, so no retention anywhere: the column goes, and says so.
    assert t["columns_without_values"] == [
        *(k for k in KEYS if k.startswith("flickr30k")),
        "cifar100_top1",
        "sugarcrepe_mean",
        "zeroshot_top1_retention",
    ]
    # Nothing at all: every column stays, every row is missing.
    empty = table({})
    assert len(empty["columns"]) == 13 and all(r["status"] == "missing" for r in empty["rows"])


def test_markdown_rows_missing_and_warnings():
    workspace = apply_overrides(PARAMS, {"teacher.regions": "whole_image"})
    t = table(
        RESULTS, ["full", "no_yolo", "no_teacher"], params={"full": workspace}, baseline="0123456789abcdef"
    )
    md = to_markdown(t)
    lines = md.splitlines()
    assert lines[0] == "# Ablations (the paper's Table 4 layout)"
    assert "of baseline commit `0123456`." in lines[2]
    assert lines[4] == (
        "| variant | COCO T→I R@1 | COCO T→I R@5 | COCO I→T R@1 | COCO I→T R@5 | Flickr30k T→I R@1 "
        "| Flickr30k T→I R@5 | Flickr30k I→T R@1 | Flickr30k I→T R@5 | ImageNet top-1 | CIFAR-10 top-1 "
        "| SugarCrepe mean | zero-shot retention |"
    )
    assert lines[5] == "| --- |" + " ---: |" * 12
    assert (
        lines[6]
        == "| CLIP (base) | 10.00 | 30.00 | 20.00 | 40.00 | 30.00 | 50.00 | 40.00 | 60.00 | 50.00 | 80.00 | 60.00 | 1.000 |"
    )
    assert (
        lines[7]
        == "| DCLIP (full) | 20.00 | 50.00 | 25.00 | 45.00 | 40.00 | 60.00 | 50.00 | 70.00 | 45.00 | 80.00 | 70.00 | 0.950 |"
    )
    assert lines[8] == "| w/o YOLO regions (whole image) (`no_yolo`) |" + " – |" * 12
    assert (
        lines[9]
        == "| w/o teacher (λ_cos = 0) (`no_teacher`) | 15.00 | 40.00 | 20.00 | 40.00 | – | – | – | – | 40.00 | 40.00 | – | 0.650 |"
    )
    assert "- `no_yolo` (w/o YOLO regions (whole image)): `dclip ablations run no_yolo`" in lines
    assert "- `full`: teacher.regions is 'whole_image', not 'yolo'" in lines
    assert lines[-1] == "No values (not evaluated): `cifar100_top1`."
    extra = to_markdown(table(RESULTS, ["no_region_weights"]))
    assert "| w/o region weights † (`no_region_weights`) |" in extra


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
    try:
        out = sh(["dclip", "ablations", "run", "no_teacher"], root)
        # Only what λ_cos feeds re-ran: distill, evaluate@student, report.
        for stage in ("distill", "evaluate@student", "report"):
            assert f"Running stage '{stage}'" in out, out
        for stage in ("curate", "detect", "embed", "train_teacher", "evaluate@base"):
            assert f"Running stage '{stage}'" not in out, out
        shown = sh(
            ["dvc", "exp", "show", "--csv"], root
        ).splitlines()  # the text table is cut to the terminal
        assert [line.split(",")[0] for line in shown[1:]] == ["", "", "no_teacher"]  # workspace, HEAD, it

        report = sh(["dclip", "report", "--ablations"], root)
        t = json.loads(out_files[1].read_text())
        rows = {r["name"]: r for r in t["rows"]}
        assert [rows[n]["status"] for n in ("base", "full", "no_teacher")] == ["present"] * 3
        assert all(not r["warnings"] for r in t["rows"])
        assert {m["name"] for m in t["missing"]} == {
            "no_yolo",
            "no_bidirectional",
            "no_cross_attention",
            "no_region_weights",
        }
        # The row is the experiment's own evaluation, read here straight from its git commit.
        ref = next(
            r
            for r in sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).split()
            if r.endswith("/no_teacher")
        )
        assert yaml.safe_load(sh(["git", "show", f"{ref}:params.yaml"], root))["distill"]["lambda_cos"] == 0.0
        exp = json.loads(sh(["git", "show", f"{ref}:metrics/student.json"], root))
        workspace = json.loads((root / "metrics" / "student.json").read_text())
        for name, source in (("no_teacher", exp), ("full", workspace)):
            assert (
                rows[name]["cells"]["coco_text_to_image_R@1"]
                == source["retrieval"]["coco"]["text_to_image"]["R@1"]
            )
            assert rows[name]["cells"]["imagenet_top1"] == source["zeroshot"]["imagenet"]["top1"]
        r1 = 100 * exp["retrieval"]["coco"]["text_to_image"]["R@1"]
        md = out_files[0].read_text()
        assert f"| w/o teacher (λ_cos = 0) (`no_teacher`) | {r1:.2f} |" in md
        assert "- `no_yolo` (w/o YOLO regions (whole image)): `dclip ablations run no_yolo`" in md
        assert md in report

        # Already made for this commit: kept, nothing run.
        again = sh(["dclip", "ablations", "run", "no_teacher", "--skip-existing"], root)
        assert "no_teacher: already run for this commit; skipped" in again and "Running stage" not in again
    finally:
        for path in out_files:
            path.unlink(missing_ok=True)
        refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).split()
        made = [r for r in refs if r.endswith("/no_teacher")]
        if made:
            sh(["dvc", "exp", "remove", *made], root)
    # The workspace was never touched.
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], root)
    assert sh(["git", "status", "--porcelain"], root) == git_before

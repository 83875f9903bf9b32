"""The paper recipes in configs/ and `dclip config list|use`: every recipe is a whole, valid params
file with the paper's settings; switching copies it byte for byte and never loses uncommitted
edits; on a paper recipe the demo world is off the study's DAG."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import open_clip
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import load_params
from stages import recipes
from stages.cli import app

from .helpers import STUDY_STAGES, make_pipeline_repo, sh

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PAPER = ["paper-vit-b16", "paper-vit-b32", "paper-vit-l14"]


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def key_paths(node: object, prefix: str = "") -> set[str]:
    """Dotted paths of every key; a list or scalar is a leaf."""
    if not isinstance(node, dict):
        return {prefix}
    paths = {prefix} if prefix else set()
    for key, value in node.items():
        paths |= key_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return paths


def test_the_three_paper_recipes_are_there():
    assert PAPER == sorted(p.stem for p in CONFIGS if p.stem.startswith("paper-"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_validates_and_has_exactly_params_yaml_s_keys(path):
    load_params(path)
    want, got = key_paths(_yaml(REPO / "params.yaml")), key_paths(_yaml(path))
    assert not want - got, f"{path.name} lacks {sorted(want - got)}"
    assert not got - want, f"{path.name} has keys params.yaml lacks: {sorted(got - want)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_keeps_the_demo_world_section(path):
    # demo/dvc.yaml reads `world` through its vars: a recipe must not change the demo stage.
    assert _yaml(path)["world"] == _yaml(REPO / "params.yaml")["world"]


# name: (clip.model, curate.mix, teacher.heads, teacher.aggregation_clusters, distill.lambda_anchor)
PAPER_SETTINGS = {
    "paper-vit-b32": ("ViT-B-32-quickgelu", (42000, 10000, 15000), 8, 1, 0.0),
    "paper-vit-b16": ("ViT-B-16-quickgelu", (42000, 10000, 15000), 8, 1, 0.0),
    "paper-vit-l14": ("ViT-L-14-quickgelu", (85000, 20000, 15000), 12, 3, 0.3),
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_settings(name):
    p = load_params(REPO / "configs" / f"{name}.yaml")
    model, mix, heads, clusters, anchor = PAPER_SETTINGS[name]
    assert (p.clip.model, p.clip.pretrained, p.clip.checkpoint) == (model, "openai", "data/weights/clip.pt")
    assert (p.detector.model, p.detector.weights, p.detector.checkpoint) == (
        "yolov8x.yaml",
        "yolov8x.pt",
        "data/weights/detector.pt",
    )
    assert (p.curate.mix.coco, p.curate.mix.flickr30k, p.curate.mix.cc) == mix
    assert p.curate.captions_per_image == 1
    assert (p.detect.imgsz, p.detect.conf, p.detect.iou) == (640, 0.25, 0.7)
    assert (p.teacher.heads, p.teacher.aggregation_clusters) == (heads, clusters)
    assert open_clip.get_model_config(model)["embed_dim"] == {8: 512, 12: 768}[heads]
    assert (p.teacher.epochs, p.teacher.use_epoch) == (4, 3)
    assert (p.distill.epochs, p.distill.batch_size, p.distill.accumulate) == (2, 32, 1)
    assert (p.distill.lambda_cos, p.distill.lambda_anchor) == (1.0, anchor)
    assert p.evaluate.prompts == "single"
    assert p.evaluate.datasets == [
        "coco_val",
        "flickr30k_val",
        "coco",
        "flickr30k",
        "imagenet",
        "cifar10",
        "cifar100",
        "sugarcrepe",
    ]
    assert p.teacher.target == "paper" and p.teacher.use_epoch == 3
    assert p.runtime.device == "auto" and p.distill.amp == "auto"
    # OpenAI's weights need QuickGELU; the plain config is refused by validation.
    assert open_clip.get_model_config(model)["quick_gelu"] is True


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_reads_real_data_from_data_raw(name):
    s = _yaml(REPO / "configs" / f"{name}.yaml")["sources"]
    paths = {
        "coco.images": "data/raw/coco",
        "coco.train_annotations": "data/raw/coco/annotations/captions_train2017.json",
        "flickr30k.images": "data/raw/flickr30k/flickr30k-images",
        "karpathy.folder": "data/raw/karpathy",
        "karpathy.coco": "dataset_coco.json",
        "karpathy.flickr30k": "dataset_flickr30k.json",
        "karpathy.coco_test": None,
        "karpathy.flickr30k_test": None,
        "cc.shards": "data/raw/cc",
        "imagenet.val": "data/raw/imagenet/val",
        "cifar10.folder": "data/raw/cifar-10-batches-py",
        "cifar100.folder": "data/raw/cifar-100-python",
        "sugarcrepe.annotations": "data/raw/sugarcrepe",
        "sugarcrepe.images": "data/raw/coco/val2017",
    }
    assert {k: s[k.split(".")[0]][k.split(".")[1]] for k in paths} == paths
    assert key_paths(s) == set(paths) | set(s)  # nothing else under sources


# --- `dclip config` ------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """params.yaml and configs/ in a fresh git repository, committed."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "configs", root / "configs")
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "ci@dclip.invalid")
    _git(root, "config", "user.name", "dclip tests")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "demo")
    return root


def _cli(*args: str):
    return CliRunner().invoke(app, ["config", *args])


def test_config_use_writes_the_recipe_byte_for_byte(project):
    params = project / "params.yaml"
    result = _cli("use", "paper-vit-l14", "--params", str(params))
    assert result.exit_code == 0, result.output
    assert params.read_bytes() == (project / "configs" / "paper-vit-l14.yaml").read_bytes()
    assert "dvc repro dvc.yaml" in result.output
    assert "`git checkout params.yaml` brings the demo params back" in result.output
    listing = _cli("list", "--params", str(params)).output.splitlines()
    assert [line.split()[1] for line in listing if line.startswith("* ")] == ["paper-vit-l14"]
    others = [line.split()[0] for line in listing if line.startswith("  ")]
    assert sorted(n for n in others if n.startswith("paper-")) == PAPER[:2]
    # params.yaml is uncommitted now, but it is a recipe byte for byte: switching loses nothing.
    again = _cli("use", "paper-vit-b32.yaml", "--params", str(params))
    assert again.exit_code == 0, again.output
    assert params.read_bytes() == (project / "configs" / "paper-vit-b32.yaml").read_bytes()
    # An edit on top of it is protected again.
    params.write_bytes(params.read_bytes().replace(b"epochs: 2 ", b"epochs: 3 "))
    assert _cli("use", "paper-vit-b16", "--params", str(params)).exit_code == 1


def test_config_use_refuses_to_overwrite_uncommitted_edits(project):
    params = project / "params.yaml"
    edited = params.read_bytes() + b"# my experiment\n"
    params.write_bytes(edited)
    result = _cli("use", "paper-vit-b32", "--params", str(params))
    assert result.exit_code == 1
    assert "has uncommitted changes" in result.output and "--force" in result.output
    assert params.read_bytes() == edited
    _git(project, "add", "params.yaml")  # staged, still not committed
    assert _cli("use", "paper-vit-b32", "--params", str(params)).exit_code == 1
    assert params.read_bytes() == edited
    forced = _cli("use", "paper-vit-b32", "--force", "--params", str(params))
    assert forced.exit_code == 0, forced.output
    assert params.read_bytes() == (project / "configs" / "paper-vit-b32.yaml").read_bytes()


def test_config_use_refuses_an_untracked_params_file(project):
    _git(project, "rm", "-q", "--cached", "params.yaml")
    _git(project, "commit", "-qm", "untrack")
    with pytest.raises(recipes.UncommittedError):
        recipes.use("paper-vit-b16", project / "params.yaml")


def test_config_use_outside_git_just_copies(project):
    shutil.rmtree(project / ".git")
    params = project / "params.yaml"
    params.write_text(params.read_text() + "# edited\n")
    recipes.use("paper-vit-b16", params)
    assert params.read_bytes() == (project / "configs" / "paper-vit-b16.yaml").read_bytes()


def test_config_use_unknown_name_lists_the_recipes(project):
    params = project / "params.yaml"
    before = params.read_bytes()
    result = _cli("use", "vit-b32", "--params", str(params))
    assert result.exit_code == 2
    names = ", ".join(sorted(p.stem for p in (project / "configs").glob("*.yaml")))
    assert f"error: unknown config 'vit-b32'; available: {names}" in result.output
    assert "paper-vit-b32, paper-vit-l14" in names
    assert params.read_bytes() == before


def test_config_use_refuses_an_invalid_recipe(project):
    params = project / "params.yaml"
    before = params.read_bytes()
    raw = _yaml(project / "configs" / "paper-vit-b32.yaml")
    raw["teacher"]["heads"] = 0
    raw["distill"]["epochs"] = "2"
    (project / "configs" / "broken.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = _cli("use", "broken", "--params", str(params))
    assert result.exit_code == 2
    assert "configs/broken.yaml: 2 invalid value(s)" in result.output
    assert "teacher.heads: Input should be greater than 0 (value 0)" in result.output
    assert "distill.epochs: Input should be a valid integer (value '2')" in result.output
    assert params.read_bytes() == before


@pytest.mark.e2e
def test_on_a_paper_recipe_the_demo_world_is_off_the_study_s_dag(tmp_path):
    root = make_pipeline_repo(tmp_path)
    shutil.copytree(REPO / "configs", root / "configs")

    def edges(*target: str) -> tuple[set[str], set[tuple[str, str]]]:
        dot = sh(["dvc", "dag", "--dot", *target], root)
        lines = [line.strip().rstrip(";") for line in dot.splitlines()]
        nodes = {line.strip('"') for line in lines if line.startswith('"') and "->" not in line}
        pairs = set()
        for line in dot.splitlines():
            if "->" in line:
                a, b = line.strip().rstrip(";").split(" -> ")
                pairs.add((a.strip('"'), b.strip('"')))
        return nodes, pairs

    world = "demo/dvc.yaml:world"
    study = STUDY_STAGES
    # The demo params: the world feeds curate.
    nodes, pairs = edges()
    assert nodes == study | {world} and (world, "curate") in pairs
    # A paper recipe: the world is still a stage of the project but nothing depends on it, and the
    # study's own DAG (what `dvc repro dvc.yaml`, i.e. a plain `dvc repro`, runs) leaves it out.
    recipes.use("paper-vit-b32", root / "params.yaml")
    nodes, pairs = edges()
    assert nodes == study | {world} and not [p for p in pairs if world in p]
    nodes, pairs = edges("dvc.yaml")
    assert nodes == study
    assert ("curate", "detect") in pairs and ("weights", "detect") in pairs

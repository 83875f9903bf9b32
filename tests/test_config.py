"""Params validation: every kind of bad value is refused with its key and value named."""

from __future__ import annotations

import copy

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import ParamsError, load_params, parse_params
from stages.cli import app

from .helpers import REPO


def default_raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def refused(raw: dict) -> str:
    with pytest.raises(ParamsError) as err:
        parse_params(raw, source="params.yaml", base_dir=REPO)
    return str(err.value)


def test_default_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.world.coco.karpathy_test == 1000
    assert params.world.image_size == (128, 176)


def test_default_curate_and_sources_point_at_the_demo_world():
    params = load_params(REPO / "params.yaml")
    # Every caption of an image (distill draws one per image per step): 2,500 COCO and 1,000 Flickr30k
    # images with five captions each, 1,000 CC images with one.
    assert params.curate.captions_per_image == "all"
    assert (params.curate.mix.coco, params.curate.mix.flickr30k, params.curate.mix.cc) == (12500, 5000, 1000)
    assert params.curate.caption.max_tokens is None
    assert params.sources.karpathy.folder == "demo/raw/karpathy"
    assert params.sources.karpathy.coco == "dataset_coco.json"
    assert params.sources.karpathy.coco_test is None and params.sources.karpathy.flickr30k_test is None
    assert params.sources.cifar100.folder == "demo/raw/cifar-100-python"
    raw = default_raw()
    raw["curate"]["captions_per_image"] = 1
    raw["sources"]["coco"]["unknown"] = 1
    assert "sources.coco.unknown: unknown key (value 1)" in refused(raw)
    del raw["sources"]["coco"]["unknown"]
    assert parse_params(raw, base_dir=REPO).curate.captions_per_image == 1


def test_empty_file_takes_every_default(tmp_path):
    (tmp_path / "p.yaml").write_text("")
    assert load_params(tmp_path / "p.yaml").world.seed == 0


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("world", "coco", "karpathy_test"), -5, "world.coco.karpathy_test: Input should be greater than or equal to 0 (value -5)"),
        (("world", "seed"), "3", "world.seed: Input should be a valid integer (value '3')"),
        (("world", "seed"), 3.5, "world.seed: Input should be a valid integer"),
        (("world", "cc", "shard_size"), 0, "world.cc.shard_size: Input should be greater than 0 (value 0)"),
        (("world", "image_size"), [200, 100], "world.image_size: must be [min, max] with 32 <= min <= max, got [200, 100]"),
        (("world", "image_size"), [100, 120, 140], "world.image_size: Tuple should have at most 2 items"),
        (("world", "max_objects"), 5, "world.max_objects: Input should be less than or equal to 4 (value 5)"),
        (("world", "coco", "karpathy_test"), 1400, "world.coco: karpathy_val + karpathy_test (1900) exceeds val2014 (1750)"),
        (("world", "planted_duplicates"), 1200, "world: planted_duplicates (1200) exceeds the smallest"),
        (("clip", "model"), "ViT-Q-99", "clip.model: unknown open_clip model 'ViT-Q-99' (value 'ViT-Q-99')"),
        (("clip", "pretrained"), "weights/missing.pt", "clip.pretrained: weights file 'weights/missing.pt' does not exist"),
        (("clip", "pretrained"), "laion9000", "clip.pretrained: 'laion9000' is neither 'none', an open_clip tag for DCLIP-Demo-RN64, nor a file"),
        (("detector", "model"), "yolov8q.yaml", "detector.model: unknown ultralytics model config 'yolov8q.yaml'"),
        (("clip", "checkpoint"), "", "clip.checkpoint: must be a non-empty path (value '')"),
        (("detector", "checkpoint"), " ", "detector.checkpoint: must be a non-empty path (value ' ')"),
        (("detector", "weights"), "nowhere/yolo.pt", "detector.weights: weights file 'nowhere/yolo.pt' does not exist"),
        (("curate", "mix", "cc"), -1, "curate.mix.cc: Input should be greater than or equal to 0 (value -1)"),
        (("curate", "mix", "coco"), "42000", "curate.mix.coco: Input should be a valid integer (value '42000')"),
        (("curate", "captions_per_image"), 5, "curate.captions_per_image: must be 1 or 'all' (value 5)"),
        (("curate", "captions_per_image"), True, "curate.captions_per_image: must be 1 or 'all' (value True)"),
        (("curate", "captions_per_image"), "every", "curate.captions_per_image: must be 1 or 'all' (value 'every')"),
        (("curate", "caption", "max_tokens"), 2, "curate.caption.max_tokens: Input should be greater than or equal to 3 (value 2)"),
        (("curate", "jpeg_quality"), 101, "curate.jpeg_quality: Input should be less than or equal to 100 (value 101)"),
        (("curate", "image_size"), 0, "curate.image_size: Input should be greater than 0 (value 0)"),
        (("runtime", "workers"), 0, "runtime.workers: must be a whole number above 0 or 'auto' (value 0)"),
        (("runtime", "workers"), "all", "runtime.workers: must be a whole number above 0 or 'auto' (value 'all')"),
        (("runtime", "workers"), True, "runtime.workers: must be a whole number above 0 or 'auto' (value True)"),
        (("curate", "workers"), 2, "curate.workers: unknown key (value 2)"),  # a runtime key now
        (("runtime", "batch_size", "embed"), 0, "runtime.batch_size.embed: Input should be greater than 0 (value 0)"),
        (("curate", "out"), " ", "curate.out: must be a non-empty path (value ' ')"),
        (("sources", "karpathy", "folder"), "", "sources.karpathy.folder: must be a non-empty path (value '')"),
        (("sources", "karpathy", "coco_test"), "x/coco_test_karpathy.json", "sources.karpathy.coco_test: must be a file name inside sources.karpathy.folder, without a folder (value 'x/coco_test_karpathy.json')"),
        (("sources", "coco", "karpathy"), "a.json", "sources.coco.karpathy: unknown key (value 'a.json')"),
        (("teacher", "use_epoch"), 9, "teacher.use_epoch: exceeds teacher.epochs (5) (value 9)"),
        (("teacher", "attention"), "both", "teacher.attention: Input should be 'bidirectional', 'text_to_regions', 'regions_to_text' or 'none' (value 'both')"),
        (("teacher", "aggregation_clusters"), 2, "teacher.aggregation_clusters: Input should be 1 or 3 (value 2)"),
        (("teacher", "batch_size"), 1, "teacher.batch_size: Input should be greater than or equal to 2 (value 1)"),
        (("runtime", "device"), "gpu", "runtime.device: must be auto, cpu, cuda or cuda:N (value 'gpu')"),
        (("sources", "cifar10", "folder"), 10, "sources.cifar10.folder: Input should be a valid string (value 10)"),
    ],
)  # fmt: skip
def test_bad_values_are_named(path, value, expected):
    raw = default_raw()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert expected in refused(raw)


def test_unknown_keys_are_named_at_every_depth():
    raw = default_raw()
    raw["wrold"] = {}
    raw["world"]["coco"]["train2015"] = 10
    message = refused(raw)
    assert "wrold: unknown key" in message
    assert "world.coco.train2015: unknown key (value 10)" in message
    assert "2 invalid value(s)" in message


def test_known_tags_and_existing_files_are_accepted(tmp_path):
    raw = default_raw()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "clip.pt").write_bytes(b"x")
    (tmp_path / "w" / "yolo.pt").write_bytes(b"x")
    raw["clip"] = {"model": "ViT-B-32", "pretrained": "w/clip.pt"}
    raw["detector"] = {"model": "yolov8n.yaml", "weights": "w/yolo.pt"}
    raw["curate"]["image_size"] = 224  # ViT-B-32's input
    params = parse_params(raw, base_dir=tmp_path)
    assert params.clip.pretrained == "w/clip.pt"
    raw["clip"]["pretrained"] = "laion2b_s34b_b79k"
    raw["detector"]["weights"] = "yolov8x.pt"
    assert parse_params(copy.deepcopy(raw), base_dir=tmp_path).detector.weights == "yolov8x.pt"
    raw["clip"] = {"model": "ViT-B-32-quickgelu", "pretrained": "openai"}
    assert parse_params(copy.deepcopy(raw), base_dir=tmp_path).clip.checkpoint == "data/weights/clip.pt"


def test_openai_weights_need_the_quickgelu_architecture():
    # OpenAI trained with QuickGELU; open_clip's plain ViT-B-32 uses GELU and only warns.
    raw = default_raw()
    raw["clip"] = {"model": "ViT-B-32", "pretrained": "openai"}
    assert (
        "clip.pretrained: the 'openai' weights were trained with quick_gelu=True but 'ViT-B-32' uses "
        "quick_gelu=False; use clip.model: ViT-B-32-quickgelu" in refused(raw)
    )


def test_not_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("world: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="top level must be a mapping, got list"):
        load_params(tmp_path / "b.yaml")
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_cli_check_refuses_a_broken_file_with_exit_2(tmp_path):
    raw = default_raw()
    raw["world"]["cc"]["failed"] = -1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["params", "check", str(bad)])
    assert result.exit_code == 2
    assert "world.cc.failed: Input should be greater than or equal to 0 (value -1)" in result.output
    ok = CliRunner().invoke(app, ["params", "check", str(REPO / "params.yaml")])
    assert ok.exit_code == 0, ok.output


def test_cli_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("world", "curate", "params", "demo"):
        assert command in result.output


def test_only_validates_the_named_sections(tmp_path):
    raw = default_raw()
    raw["clip"]["pretrained"] = "not/there.pt"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="clip.pretrained"):
        load_params(path)
    assert load_params(path, only=("world",)).world.coco.karpathy_test == 1000
    raw["world"]["seed"] = -1
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="world.seed"):
        load_params(path, only=("world",))


def test_teacher_targets_and_the_epoch_choice():
    params = load_params(REPO / "params.yaml")
    assert params.teacher.target == "paper" and params.distill.freeze_batchnorm is True
    raw = default_raw()
    raw["teacher"]["use_epoch"] = "best"
    raw["teacher"]["target"] = "regions"
    cfg = parse_params(raw, base_dir=REPO)
    assert (cfg.teacher.use_epoch, cfg.teacher.target) == ("best", "regions")
    raw["teacher"]["use_epoch"] = "last"
    assert "teacher.use_epoch" in refused(raw)
    raw = default_raw()
    raw["teacher"]["target"] = "regions"
    raw["teacher"]["attention"] = "text_to_regions"
    assert "attention 'text_to_regions' needs caption tokens" in refused(raw)
    raw = default_raw()
    raw["teacher"]["target"] = "own_caption"
    assert "teacher.target" in refused(raw)


def test_other_captions_need_every_caption_of_an_image():
    raw = default_raw()
    raw["teacher"]["target"] = "other_captions"
    assert parse_params(raw, base_dir=REPO).teacher.target == "other_captions"
    raw["curate"]["captions_per_image"] = 1
    assert "other_captions needs every caption of an image" in refused(raw)
    # A stage validating only the teacher section cannot know curate's setting: no error there.
    assert parse_params({"teacher": raw["teacher"]}, base_dir=REPO).teacher.target == "other_captions"


def test_the_schema_defaults_are_params_yaml_s_values():
    """Defaults have one home: the schema's defaults are the demo's params.yaml, key for key."""
    from pipeline.config import Params

    written = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()), base_dir=REPO)
    assert Params().model_dump() == written.model_dump()


def test_step_settings_have_no_defaults_of_their_own():
    """The library's settings dataclasses take every field from params: none has a default that
    could drift from params.yaml's."""
    import dataclasses

    from pipeline import curate, detect, distill, embed, teach
    from pipeline.train import Optimisation

    for cls in (
        curate.Settings,
        detect.Settings,
        embed.Settings,
        distill.Settings,
        teach.Settings,
        Optimisation,
    ):
        defaulted = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        ]
        assert defaulted == [], f"{cls.__module__}.{cls.__name__}: {defaulted}"


def test_settings_come_from_the_section_and_fail_loudly_on_a_missing_or_unknown_field():
    from pipeline import detect
    from pipeline.config import Params, settings

    section = Params().detect
    got = settings(detect.Settings, section, classes=(0, 2), batch_size=Params().runtime.batch_size.detect)
    assert got == detect.Settings(
        conf=section.conf,
        iou=section.iou,
        classes=(0, 2),
        max_regions=8,
        min_area_fraction=0.002,
        batch_size=32,
    )
    # A field the section does not hold (the batch size is a runtime key) must be given.
    with pytest.raises(TypeError, match=r"Settings: no params key Detect.batch_size for its field"):
        settings(detect.Settings, section, classes=None)
    # A section without one of the fields (here: embed has no conf) is refused, not defaulted.
    with pytest.raises(TypeError, match=r"Settings: no params key Embed.conf for its field"):
        settings(detect.Settings, Params().embed)
    with pytest.raises(TypeError, match=r"Settings has no field\(s\) \['iou_threshold'\]"):
        settings(detect.Settings, section, iou_threshold=0.5)


def test_the_teacher_architecture_s_defaults_are_the_params_defaults():
    """TeacherConfig keeps defaults (it is built in many places as a model config), so they must
    be params.yaml's: a second value for the same knob would drift."""
    import dataclasses

    from pipeline.config import Params
    from pipeline.models.teacher import TeacherConfig

    section = Params().teacher
    for f in dataclasses.fields(TeacherConfig):
        if f.default is not dataclasses.MISSING and f.name in type(section).model_fields:
            assert f.default == getattr(section, f.name), f.name


# --- rules across sections: a combination that cannot work fails when the file is read -------------


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"curate.image_size": 8},
            "curate.image_size: 8 is smaller than the input of clip.model DCLIP-Demo-RN64 (64 px)",
        ),
        (
            {"clip.model": "ViT-B-32", "clip.pretrained": "none", "curate.image_size": 160},
            "curate.image_size: 160 is smaller than the input of clip.model ViT-B-32 (224 px)",
        ),
        ({"distill.lambda_cos": float("inf")}, "distill.lambda_cos: Input should be a finite number"),
        ({"teacher.temperature": float("nan")}, "teacher.temperature: Input should be a finite number"),
        (
            {"detect.out": "data/curated"},
            "curate.out: data/curated and detect.out: data/curated overlap; give each stage output its own path",
        ),
        (
            {"runtime.scratch": "data/curated/tmp"},
            "curate.out: data/curated and runtime.scratch: data/curated/tmp overlap",
        ),
        (
            {"distill.out": "demo/raw/coco/student.pt"},
            "distill.out: demo/raw/coco/student.pt overlaps the raw input sources.coco.images: demo/raw/coco",
        ),
        (
            {"teacher.heads": 3},
            "teacher.heads: 3 does not divide the embedding width of clip.model DCLIP-Demo-RN64 (128)",
        ),
        ({"curate.shard_size": 10**9}, "curate.shard_size: Input should be less than or equal to 100000"),
        # A source switched off (null) is asked for by nothing; an enabled one has what it needs.
        (
            {"sources.cc": None},
            "curate.mix.cc: 1000 pairs asked of sources.cc, which is null (switched off); "
            "set curate.mix.cc: 0, or give sources.cc",
        ),
        (
            {"sources.imagenet": None},
            "evaluate.datasets: imagenet is built from sources.imagenet, which is null (switched off); "
            "leave imagenet out of evaluate.datasets, or give sources.imagenet",
        ),
        (
            {"sources.coco": None, "curate.mix.coco": 0},
            "evaluate.datasets: coco_val is built from sources.coco, which is null",
        ),
        (
            {"sources.coco.train_annotations": None},
            "curate.mix.coco: 12500 pairs asked, but sources.coco.train_annotations is null",
        ),
        ({"sources.karpathy": None}, "sources.karpathy is null, but sources.coco is on"),
        (
            {"sources.karpathy.flickr30k": None},
            "sources.karpathy.flickr30k is null, but sources.flickr30k is on",
        ),
        (
            {"sources.cc.shards": "data/raw/cc"},
            "sources.cc.shards: data/raw/cc lies outside sources.root: demo/raw; the curate stage depends "
            "on that folder alone",
        ),
        (
            {"distill.out": "demo/raw/student.pt"},
            "distill.out: demo/raw/student.pt overlaps the raw input sources.root: demo/raw",
        ),
        ({"world.cc.shard_size": 10**9}, "world.cc.shard_size: Input should be less than or equal to 100000"),
    ],
)
def test_combinations_that_cannot_work_are_refused_up_front(change, expected):
    # Before: `dclip params check` said ok to each of these.
    raw = default_raw()
    for dotted, value in change.items():
        node = raw
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    assert expected in refused(raw)


def test_a_source_switched_off_everywhere_is_accepted_and_not_read(tmp_path):
    """CC and ImageNet off (mix null, source null, not evaluated), COCO training off (mix 0):
    the params are valid, and curate's inputs leave out CC's shards, ImageNet and COCO's
    training annotations (COCO's images and Karpathy file still give its val and test sets)."""
    from pipeline.curate import SourcePaths

    raw = default_raw()
    raw["curate"]["mix"].update({"cc": None, "coco": 0})
    raw["sources"]["cc"] = raw["sources"]["imagenet"] = None
    raw["evaluate"]["datasets"].remove("imagenet")
    params = parse_params(raw, source="params.yaml", base_dir=REPO)
    assert params.curate.mix.cc == 0
    keys = [key for key, _ in SourcePaths.resolve(params.sources, tmp_path, params.curate.mix).named()]
    assert keys == [
        "sources.coco.images",
        "sources.karpathy.coco",
        "sources.flickr30k.images",
        "sources.karpathy.flickr30k",
        "sources.cifar10.folder",
        "sources.cifar100.folder",
        "sources.sugarcrepe.annotations",
        "sources.sugarcrepe.images",
    ]


def test_a_rule_across_sections_prints_each_problem_once_without_the_whole_file():
    raw = default_raw()
    raw["curate"]["image_size"] = 8
    raw["detect"]["out"] = "data/curated"
    lines = refused(raw).splitlines()
    assert lines[0] == "params.yaml: 2 invalid value(s) or combination(s)"
    assert len(lines) == 3 and all(len(line) < 200 for line in lines)


def test_the_cli_check_refuses_a_combination_with_exit_2(tmp_path):
    raw = default_raw()
    raw["runtime"]["scratch"] = raw["embed"]["out"]
    for section in ("clip", "detector"):  # weights files relative to the repository
        for key in ("pretrained", "weights"):
            if key in raw[section]:
                raw[section][key] = str(REPO / raw[section][key])
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["params", "check", str(bad)])
    assert result.exit_code == 2
    assert "embed.out: data/embeddings and runtime.scratch: data/embeddings overlap" in result.output


# --- YAML numbers as DVC writes them ----------------------------------------------------------------


def test_params_numbers_are_read_as_yaml_1_2_reads_them():
    # PyYAML (YAML 1.1) reads 1e-5 and 1e-05 as strings: a float needs a dot there.
    assert yaml.safe_load("lr: 1e-5") == {"lr": "1e-5"}
    from pipeline.config import read_yaml

    text = "a: 1e-5\nb: 1e-05\nc: .5\nd: 1E+3\ne: -2e-3\nf: 1\ng: 1_000\nh: 12e\ni: v1e5\nj: 1.5e-3"
    assert read_yaml(text) == {
        "a": 1e-5,
        "b": 1e-5,
        "c": 0.5,
        "d": 1000.0,
        "e": -0.002,
        "f": 1,
        "g": 1000,
        "h": "12e",
        "i": "v1e5",
        "j": 0.0015,
    }


def test_a_learning_rate_set_by_dvc_exp_run_is_a_number(tmp_path):
    # `dvc exp run -S distill.lr=1e-5` writes `lr: 1e-05`, which was refused as "not a valid
    # number": every sweep over a learning rate failed. Through a real DVC experiment.
    from .helpers import sh

    raw = default_raw()
    raw["clip"]["pretrained"] = str(REPO / raw["clip"]["pretrained"])
    raw["detector"]["weights"] = str(REPO / raw["detector"]["weights"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stage = {"cmd": "dclip params check params.yaml", "params": ["distill.lr"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"check": stage}}))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "ci@dclip.invalid"],
        ["git", "config", "user.name", "dclip tests"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "params"],
    ):
        sh(cmd, tmp_path)
    out = sh(["dvc", "exp", "run", "-S", "distill.lr=1e-5"], tmp_path)
    assert "params.yaml: ok" in out
    assert "lr: 1e-05" in (tmp_path / "params.yaml").read_text()  # what DVC wrote
    assert load_params(tmp_path / "params.yaml").distill.lr == 1e-5


def test_params_check_names_every_raw_input_that_is_not_there(tmp_path):
    # Before: `dclip params check` said ok to a recipe with no data/raw at all.
    raw = default_raw()
    for section in ("clip", "detector"):
        for key in ("pretrained", "weights"):
            if key in raw[section]:
                raw[section][key] = str(REPO / raw[section][key])
    # The sources under data/raw (nothing makes them): all there but CC's shards and ImageNet.
    raw["sources"] = yaml.safe_load(yaml.safe_dump(raw["sources"]).replace("demo/raw", "data/raw"))
    src = raw["sources"]
    for folder in (
        src["coco"]["images"],
        src["flickr30k"]["images"],
        src["cifar10"]["folder"],
        src["cifar100"]["folder"],
        src["sugarcrepe"]["annotations"],
        src["sugarcrepe"]["images"],
    ):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / src["coco"]["train_annotations"]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / src["coco"]["train_annotations"]).write_text("{}")
    (tmp_path / src["karpathy"]["folder"]).mkdir(parents=True)
    for name in ("coco", "flickr30k"):
        (tmp_path / src["karpathy"]["folder"] / src["karpathy"][name]).write_text("{}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["params", "check", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: {tmp_path / 'params.yaml'}: 2 raw input(s) not found (the curate stage reads them)",
        f"  sources.cc.shards: {tmp_path / 'data/raw/cc'} does not exist",
        f"  sources.imagenet.val: {tmp_path / 'data/raw/imagenet/val'} does not exist",
    ]
    # Switched off, neither is needed: CC by a mix of 0 (or null), ImageNet by a null source and
    # no evaluation of it.
    raw["curate"]["mix"]["cc"] = None
    raw["sources"]["imagenet"] = None
    raw["evaluate"]["datasets"].remove("imagenet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    off = CliRunner().invoke(app, ["params", "check", str(tmp_path / "params.yaml")])
    assert off.exit_code == 0, off.output
    (tmp_path / "data/raw/cc").mkdir(parents=True)
    (tmp_path / "data/raw/imagenet/val").mkdir(parents=True)
    raw = yaml.safe_load(yaml.safe_dump(raw))
    raw["sources"]["imagenet"] = {"val": "data/raw/imagenet/val"}
    raw["curate"]["mix"]["cc"] = 1000
    raw["evaluate"]["datasets"].append("imagenet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    ok = CliRunner().invoke(app, ["params", "check", str(tmp_path / "params.yaml")])
    assert ok.exit_code == 0, ok.output
    # The demo's inputs lie inside world.out: its stage makes them, so none is missing before it.
    demo = default_raw()
    for section, key in (("clip", "pretrained"), ("detector", "weights")):
        demo[section][key] = str(REPO / demo[section][key])
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "params.yaml").write_text(yaml.safe_dump(demo))
    made = CliRunner().invoke(app, ["params", "check", str(tmp_path / "demo" / "params.yaml")])
    assert made.exit_code == 0 and not (tmp_path / "demo" / "demo").exists(), made.output


def test_a_recipe_is_checked_where_it_lies_with_paths_relative_to_the_project():
    # Before: `dclip params check configs/paper-vit-b32.yaml` looked for configs/data/raw/….
    if (REPO / "data" / "raw").exists():
        pytest.skip("this checkout has data/raw: the recipe's inputs may be there")
    result = CliRunner().invoke(app, ["params", "check", str(REPO / "configs" / "paper-vit-b32.yaml")])
    assert result.exit_code == 2
    assert f"  sources.coco.images: {REPO / 'data/raw/coco'} does not exist" in result.output.splitlines()
    assert "configs/data" not in result.output

"""pipeline.evaluate and the evaluate / report stages: the demo's real open_clip CLIP on the tiny
world's curated evaluation sets."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from pipeline import images
from pipeline.config import ParamsError, parse_params
from pipeline.evaluate import (
    CURVE_MAX_K,
    SINGLE_PROMPT,
    SetEncoder,
    evaluate,
    prompt_templates,
    queries_table,
)
from pipeline.models.clip import Encoder, create
from pipeline.runtime import pick_device
from pipeline.shards import ShardWriter, read_shard
from stages import curate as curate_stage
from stages import evaluate as evaluate_stage
from stages import weights as weights_stage
from stages.cli import app
from stages.outputs import read_record

from .helpers import REPO

ALL_SETS = ["coco_val", "flickr30k_val", "coco", "flickr30k", "imagenet", "cifar10", "cifar100", "sugarcrepe"]


@pytest.fixture(scope="module")
def project(tiny_world, tmp_path_factory) -> Path:
    """A project folder: the tiny world as demo/raw, the demo weights, params with a small curate
    mix, and its curated data."""
    root = tmp_path_factory.mktemp("project")
    (root / "demo").mkdir()
    (root / "demo" / "raw").symlink_to(tiny_world)
    (root / "demo" / "weights").symlink_to(REPO / "demo" / "weights")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["curate"].update(mix={"coco": 6, "flickr30k": 4, "cc": 4}, shard_size=8)
    params["runtime"].update(workers=1, batch_size={"detect": 32, "embed": 64, "evaluate": 16})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    curate_stage.run(root / "params.yaml", progress=False)
    weights_stage.run(root / "params.yaml")  # data/weights/clip.pt, the base model evaluate loads
    return root


@pytest.fixture(scope="module")
def demo_clip():
    return create("DCLIP-Demo-RN64", str(REPO / "demo" / "weights" / "clip-DCLIP-Demo-RN64.pt"))


def encoder(demo_clip, **kw) -> SetEncoder:
    net, preprocess, tokenizer = demo_clip
    clip = Encoder(net, preprocess, tokenizer, torch.device("cpu"))
    return SetEncoder(clip, progress=False, **{"batch_size": 16, "workers": 0, **kw})


def manifest(project: Path, path: str) -> list[dict]:
    return pq.read_table(project / "data" / "curated" / path).to_pylist()


# --- embedding ---------------------------------------------------------------------------------


def test_image_embeddings_follow_the_manifest_whatever_the_workers(project, demo_clip):
    net, preprocess, _ = demo_clip
    curated = project / "data" / "curated"
    rows = manifest(project, "eval/imagenet/test.parquet")
    keys, shards = [r["key"] for r in rows], [r["shard"] for r in rows]
    # Listed in another order than the shards hold them.
    keys, shards = keys[::-1], shards[::-1]
    one = encoder(demo_clip, workers=0, batch_size=7).images(curated, keys, shards)
    two = encoder(demo_clip, workers=2, batch_size=16).images(curated, keys, shards)
    assert one.shape == (len(rows), 128)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.norm(dim=1), torch.ones(len(rows)))
    # Each row is that key's image, straight through the model.
    samples = {k: s for shard in sorted(set(shards)) for k, s in read_shard(curated / shard)}
    for i in (0, len(keys) // 2, len(keys) - 1):
        pixels = preprocess(images.decode(samples[keys[i]]["jpg"]))[None]
        with torch.inference_mode():
            want = F.normalize(net.encode_image(pixels), dim=-1)[0]
        torch.testing.assert_close(one[i], want, rtol=0, atol=1e-5)


def test_class_embedding_is_the_renormalised_mean_of_normalised_prompts(demo_clip):
    enc = encoder(demo_clip)
    templates = prompt_templates("openai")[:3]
    got = enc.classes(["red circle", "blue star"], templates)
    for i, name in enumerate(["red circle", "blue star"]):
        prompts = enc.texts([t(name) for t in templates])
        torch.testing.assert_close(got[i], F.normalize(prompts.mean(0), dim=0), rtol=0, atol=1e-5)
    single = enc.classes(["red circle"], prompt_templates("single"))
    torch.testing.assert_close(
        single[0], enc.texts(["This is a photo of a red circle"])[0], rtol=0, atol=1e-5
    )


def test_prompt_sets():
    assert prompt_templates("single") == (SINGLE_PROMPT,)
    assert SINGLE_PROMPT.format("dog") == "This is a photo of a dog"
    openai = prompt_templates("openai")
    assert len(openai) == 80 and openai == tuple(open_clip.OPENAI_IMAGENET_TEMPLATES)
    with pytest.raises(ValueError, match="single' or 'openai'"):
        prompt_templates("many")


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda:0")


# --- the evaluation ------------------------------------------------------------------------------


def test_metrics_of_every_set(project, demo_clip):
    curated = project / "data" / "curated"
    result = evaluate(encoder(demo_clip), curated, ALL_SETS, "single")
    for name, path in (
        ("coco", "eval/coco/test.parquet"),
        ("flickr30k", "eval/flickr30k/test.parquet"),
        ("coco_val", "eval/coco/val.parquet"),
        ("flickr30k_val", "eval/flickr30k/val.parquet"),
    ):
        rows = manifest(project, path)
        got = result.metrics["retrieval"][name]
        n_img, n_cap = len(rows), sum(len(r["captions"]) for r in rows)
        assert (got["images"], got["captions"]) == (n_img, n_cap)
        for direction in ("text_to_image", "image_to_text"):
            m = got[direction]
            assert set(m) == {"R@1", "R@5", "R@10", "mAP", "MRR", "clip_benchmark"}
            assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1
            assert all(m[f"R@{k}"] <= m["clip_benchmark"][f"R@{k}"] for k in (1, 5, 10))
            assert 0 < m["MRR"] <= 1 and 0 < m["mAP"] <= 1
            assert m["R@1"] <= m["MRR"]
            curve = result.curves[f"{name}_{direction}"]
            assert len(curve) == CURVE_MAX_K and curve == sorted(curve) and curve[-1] <= 1
            assert [curve[0], curve[4], curve[9]] == [m["R@1"], m["R@5"], m["R@10"]]
        assert got["text_to_image"]["mAP"] == got["text_to_image"]["MRR"]
        assert got["chance"]["text_to_image"]["R@1"] == round(1 / n_img, 4)
    for name in ("imagenet", "cifar10", "cifar100"):
        n_classes = len((curated / "eval" / name / "classnames.txt").read_text().splitlines())
        got = result.metrics["zeroshot"][name]
        assert got["images"] == len(manifest(project, f"eval/{name}/test.parquet"))
        assert (got["classes"], got["templates"]) == (n_classes, 1)
        assert 0 <= got["top1"] <= got["top5"] <= 1
        assert got["chance"] == {
            "top1": round(1 / n_classes, 4),
            "top5": round(min(5, n_classes) / n_classes, 4),
        }
    probe = result.metrics["probe"]["sugarcrepe"]
    rows = manifest(project, "eval/sugarcrepe/test.parquet")
    assert probe["images"] == len({r["key"] for r in rows}) and sum(probe["items"].values()) == len(rows)
    assert set(probe["accuracy"]) == {*probe["items"], "mean"} and probe["chance"] == 0.5
    assert probe["accuracy"]["mean"] == pytest.approx(
        sum(v for k, v in probe["accuracy"].items() if k != "mean") / len(probe["items"]), abs=1e-4
    )
    assert result.images == sum(
        result.metrics[kind][name]["images"] for kind in result.metrics for name in result.metrics[kind]
    )
    # Every query's place: each metric is recomputed from the queries table alone.
    table = queries_table(result).to_pylist()
    places = lambda d, t: [r["place"] for r in table if (r["dataset"], r["task"]) == (d, t)]  # noqa: E731
    for name in ("coco", "flickr30k", "coco_val", "flickr30k_val"):
        got = result.metrics["retrieval"][name]
        for direction, n in (("text_to_image", got["captions"]), ("image_to_text", got["images"])):
            ranks = places(name, direction)
            assert len(ranks) == n
            for k in (1, 5, 10):
                assert round(sum(r < k for r in ranks) / n, 4) == got[direction][f"R@{k}"]
            assert round(sum(1 / (r + 1) for r in ranks) / n, 4) == got[direction]["MRR"]
    for name in ("imagenet", "cifar10", "cifar100"):
        ranks = places(name, "zero_shot")
        assert round(sum(r < 1 for r in ranks) / len(ranks), 4) == result.metrics["zeroshot"][name]["top1"]
    # Each query's best five candidates: a query whose positive is placed first (strictly above
    # every other candidate) has it first; a query whose positive is beyond the top 5 lacks it.
    for name in ("coco", "flickr30k"):
        captions = manifest(project, f"eval/{name}/test.parquet")
        true_image = [i for i, r in enumerate(captions) for _ in r["captions"]]
        shown = [r for r in table if (r["dataset"], r["task"]) == (name, "text_to_image")]
        assert all(len(r["top"]) == 5 and len(set(r["top"])) == 5 for r in shown)
        assert all(r["top"][0] == true_image[r["query"]] for r in shown if r["place"] == 0)
        assert all(true_image[r["query"]] not in r["top"] for r in shown if r["place"] >= 5)
    for name in ("cifar10",):
        labels = [r["label"] for r in manifest(project, f"eval/{name}/test.parquet")]
        shown = [r for r in table if (r["dataset"], r["task"]) == (name, "zero_shot")]
        assert all(r["top"][0] == labels[r["query"]] for r in shown if r["place"] == 0)
    assert all(r["top"] is None for r in table if r["task"] == "probe")
    items = [r for r in table if r["task"] == "probe"]
    assert len(items) == len(rows) and {r["category"] for r in items} == set(probe["items"])
    for category, accuracy in probe["accuracy"].items():
        if category != "mean":
            mine = [r["place"] == 0 for r in items if r["category"] == category]
            assert round(sum(mine) / len(mine), 4) == accuracy
    # The text side's ceiling: the frozen text tower's cosine of caption and negative, per category.
    assert set(probe["text_cosine"]) == set(probe["accuracy"])
    assert all(-1 <= v <= 1 for v in probe["text_cosine"].values())


def test_the_probe_scores_each_item_with_its_own_image(project, demo_clip):
    """Recomputed by hand: one image, its caption and its negative, item by item."""
    from pipeline.evaluate import probe

    curated = project / "data" / "curated"
    enc = encoder(demo_clip)
    got, queries = probe(enc, curated, "sugarcrepe")
    rows = manifest(project, "eval/sugarcrepe/test.parquet")
    keys = list(dict.fromkeys(r["key"] for r in rows))
    shards = {r["key"]: r["shard"] for r in rows}
    img = dict(zip(keys, enc.images(curated, keys, [shards[k] for k in keys])))
    right = {}
    for r in rows:
        pos, neg = enc.texts([r["caption"], r["negative_caption"]])
        right.setdefault(r["category"], []).append(float(img[r["key"]] @ pos) > float(img[r["key"]] @ neg))
    for category, hits in right.items():
        assert got["accuracy"][category] == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    # Each item's place, in the manifest's order: 0 where its caption won, 1 where the negative
    # won or tied.
    won = [
        float(img[r["key"]] @ enc.texts([r["caption"]])[0])
        > float(img[r["key"]] @ enc.texts([r["negative_caption"]])[0])
        for r in rows
    ]
    assert queries["place"] == [0 if w else 1 for w in won]
    assert queries["category"] == [r["category"] for r in rows]


def test_trained_weights_beat_chance_and_an_untrained_model(project, demo_clip):
    """The demo CLIP has learnt something the evaluation sees: retrieval far above chance, and
    above the same architecture randomly initialised."""
    curated = project / "data" / "curated"
    trained = evaluate(encoder(demo_clip), curated, ["coco", "flickr30k"], "single").metrics["retrieval"]
    torch.manual_seed(0)
    untrained = evaluate(
        encoder(create("DCLIP-Demo-RN64", "none")), curated, ["coco", "flickr30k"], "single"
    ).metrics["retrieval"]
    for name in ("coco", "flickr30k"):
        for direction in ("text_to_image", "image_to_text"):
            chance = trained[name]["chance"][direction]["R@1"]
            assert trained[name][direction]["R@1"] > 3 * chance
            assert trained[name][direction]["MRR"] > untrained[name][direction]["MRR"]


def test_openai_prompts_average_80_templates(project, demo_clip):
    got = evaluate(encoder(demo_clip), project / "data" / "curated", ["cifar10"], "openai")
    assert got.metrics == {"zeroshot": {"cifar10": got.metrics["zeroshot"]["cifar10"]}}
    assert got.metrics["zeroshot"]["cifar10"]["templates"] == 80


def copy_curated(project: Path, tmp_path: Path) -> Path:
    """The curated CIFAR-10 set and the index of every set built; the others' files are not there."""
    out = tmp_path / "curated"
    shutil.copytree(project / "data" / "curated" / "eval" / "cifar10", out / "eval" / "cifar10")
    shutil.copy(project / "data" / "curated" / "eval" / "sets.json", out / "eval" / "sets.json")
    return out


def test_a_missing_set_is_named(project, demo_clip, tmp_path):
    curated = copy_curated(project, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"eval/coco/test\.parquet"):
        evaluate(encoder(demo_clip), curated, ["cifar10", "coco"], "single")


def test_a_set_curate_did_not_build_is_named_with_the_reason(project, demo_clip, tmp_path):
    curated = copy_curated(project, tmp_path)
    (curated / "eval" / "sets.json").write_text(json.dumps({"cifar10": ["test"]}))
    with pytest.raises(FileNotFoundError) as err:
        evaluate(encoder(demo_clip), curated, ["cifar10", "imagenet", "coco_val"], "single")
    assert "curate did not build imagenet, coco_val (its source is switched off" in str(err.value)


def test_shards_and_manifest_must_agree(project, demo_clip, tmp_path):
    curated = copy_curated(project, tmp_path)
    rows = manifest(project, "eval/cifar10/test.parquet")
    keys, shards = [r["key"] for r in rows], [r["shard"] for r in rows]
    enc = encoder(demo_clip)
    with pytest.raises(ValueError, match="not in the set's manifest"):
        enc.images(curated, keys[1:], shards[1:])
    with pytest.raises(ValueError, match="1 manifest key"):
        enc.images(curated, [*keys, "cifar10-99999"], [*shards, shards[0]])
    # A shard sample without an image.
    folder = curated / "eval" / "broken" / "test"
    with ShardWriter(folder, max_count=10) as w:
        w.write("x-1", {"cls": "0"})
    with pytest.raises(ValueError, match="has no image"):
        enc.images(curated, ["x-1"], ["eval/broken/test/00000.tar"])


# --- the stages ----------------------------------------------------------------------------------


def test_stage_writes_metrics_and_curves_then_the_report(project, capsys):
    metrics = evaluate_stage.run(project / "params.yaml", "base", progress=False)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "base" and summary["weights"] == "data/weights/clip.pt"
    assert summary["images_per_second"] > 0
    written = json.loads((project / "metrics" / "base.json").read_text())
    assert read_record(project / "metrics", "base") == metrics
    assert set(written) == {"retrieval", "zeroshot", "probe"}
    # The metrics file holds figures; sizes and chance levels are in the info file beside it.
    assert "images" not in written["retrieval"]["coco"] and "chance" not in written["zeroshot"]["cifar10"]
    coco = metrics["retrieval"]["coco"]["text_to_image"]
    assert written["retrieval"]["coco"]["text_to_image"]["R@1"] == coco["R@1"]
    with open(project / "metrics" / "recall" / "base.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["k"]) for r in rows] == list(range(1, CURVE_MAX_K + 1))
    assert set(rows[0]) == {
        "k",
        *(
            f"{s}_{d}"
            for s in ("coco", "flickr30k", "coco_val", "flickr30k_val")
            for d in ("text_to_image", "image_to_text")
        ),
    }
    queries = pq.read_table(project / "metrics" / "queries" / "base.parquet")
    assert queries.schema.names == ["dataset", "task", "category", "query", "place", "top"]
    assert set(queries.column("dataset").to_pylist()) == set(ALL_SETS)
    assert float(rows[0]["coco_text_to_image"]) == metrics["retrieval"]["coco"]["text_to_image"]["R@1"]

    # The same checkpoint under another name, on CIFAR-10 only: the report compares the two.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["datasets"] = ["cifar10"]
    (project / "cifar10.yaml").write_text(yaml.safe_dump(params))
    weights = ["--weights", "demo/weights/clip-DCLIP-Demo-RN64.pt"]
    args = ["evaluate", "--model", "copy", *weights, "--params", str(project / "cifar10.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["report", "base", "copy", "--metrics-dir", str(project / "metrics")])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "metrics" / "report.json").read_text())
    assert report["reference"] == "base" and report["models"] == ["base", "copy"]
    # 4 sets × 2 directions × (R@1, R@5, R@10, the same in CLIP_benchmark's way, mAP, MRR)
    assert len(report["retrieval"]) == 4 * 2 * 8 and len(report["zeroshot"]) == 3 * 3
    for row in report["retrieval"] + report["zeroshot"]:
        if row["dataset"] == "cifar10":
            assert row["values"]["copy"] == row["values"]["base"]
            assert row["gain"]["copy"] == 0 and row["retention"]["copy"] in (1.0, None)
        else:
            assert row["values"]["copy"] is None and row["gain"]["copy"] is None
    markdown = (project / "metrics" / "report.md").read_text()
    assert "| COCO test (15 images, 75 captions) | text→image | R@1 |" in markdown
    assert markdown in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "teacher"], "model 'teacher': no default checkpoint"),
        (["--model", "a/b"], "letters, digits"),
        (["--weights", "missing.pt"], "weights of model 'base': weights file 'missing.pt' does not exist"),
    ],
)
def test_stage_refuses_bad_models_with_exit_2(project, args, message):
    result = CliRunner().invoke(app, ["evaluate", *args, "--params", str(project / "params.yaml")])
    assert result.exit_code == 2
    assert message in result.output


def test_report_needs_the_metrics(tmp_path):
    result = CliRunner().invoke(app, ["report", "base", "student", "--metrics-dir", str(tmp_path)])
    assert result.exit_code == 3
    assert "no metrics for base, student" in result.output


# --- params ----------------------------------------------------------------------------------------


def test_default_evaluate_params():
    cfg = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()), base_dir=REPO).evaluate
    assert cfg.datasets == ALL_SETS and cfg.prompts == "single"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"datasets": []}, "evaluate.datasets: name at least one data set (value [])"),
        ({"datasets": ["coco", "coco"]}, "evaluate.datasets: a data set is named twice"),
        ({"datasets": ["mnist"]}, "evaluate.datasets.0: Input should be 'coco_val', 'flickr30k_val', 'coco'"),
        ({"datasets": "coco"}, "evaluate.datasets: Input should be a valid list (value 'coco')"),
        ({"prompts": "all"}, "evaluate.prompts: Input should be 'single' or 'openai' (value 'all')"),
        ({"workers": 2}, "evaluate.workers: unknown key (value 2)"),  # runtime.workers
        ({"prompt": "single"}, "evaluate.prompt: unknown key (value 'single')"),
    ],
)
def test_bad_evaluate_params_are_named(value, expected):
    with pytest.raises(ParamsError) as err:
        parse_params({"evaluate": value}, source="params.yaml", base_dir=REPO)
    assert expected in str(err.value)


def clip_benchmark_loader(curated: Path, name: str, split: str, preprocess, task: str):
    """CLIP_benchmark's own `wds/` dataset over a curated set, batched as its CLI batches one."""
    from clip_benchmark.datasets.builder import build_dataset
    from torch.utils.data import DataLoader

    root = str(curated / "eval" / name)
    dataset = build_dataset(f"wds/{name}", root=root, transform=preprocess, split=split, task=task)
    return dataset, DataLoader(dataset.batched(64), batch_size=None, shuffle=False, num_workers=0)


def test_the_clip_benchmark_figures_are_what_clip_benchmark_s_own_evaluation_gives(project, demo_clip):
    """CLIP_benchmark's `zeroshot_retrieval.evaluate` (a dev dependency), reading the curated COCO
    and Flickr30k test sets through its own `wds/` loader (the layout is its WebDataset layout):
    its R@k equal the evaluate stage's `clip_benchmark` figures, both ways. The project's own R@k
    count ties against the model and may only be lower."""
    from clip_benchmark.metrics import zeroshot_retrieval

    net, preprocess, tokenizer = demo_clip
    curated = project / "data" / "curated"
    ours = evaluate(encoder(demo_clip, batch_size=256), curated, ["coco", "flickr30k"], "single").metrics
    for name in ("coco", "flickr30k"):
        _, loader = clip_benchmark_loader(curated, name, "test", preprocess, "zeroshot_retrieval")
        theirs = zeroshot_retrieval.evaluate(
            net, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
        )
        got = ours["retrieval"][name]
        assert got["images"] > 0
        for k in (1, 5, 10):
            assert got["text_to_image"]["clip_benchmark"][f"R@{k}"] == round(
                theirs[f"image_retrieval_recall@{k}"], 4
            )
            assert got["image_to_text"]["clip_benchmark"][f"R@{k}"] == round(
                theirs[f"text_retrieval_recall@{k}"], 4
            )
            for direction in ("text_to_image", "image_to_text"):
                assert got[direction][f"R@{k}"] <= got[direction]["clip_benchmark"][f"R@{k}"]


def test_zero_shot_figures_are_what_clip_benchmark_gives_from_its_own_loader(project, demo_clip):
    """CLIP_benchmark's zero-shot classifier and classification run on the curated zero-shot
    sets, read by its `wds/` loader with the class names and template file curate wrote beside
    them: the same top-1, top-5 and mean per-class recall (its balanced accuracy) as the evaluate
    stage with the paper's single prompt. (Its `evaluate` itself cannot run here: its `accuracy`
    calls float() on a one-element array, which numpy 2 refuses; top-k is counted from its logits.)"""
    from clip_benchmark.metrics import zeroshot_classification as cb
    from sklearn.metrics import balanced_accuracy_score

    net, preprocess, tokenizer = demo_clip
    curated = project / "data" / "curated"
    ours = evaluate(encoder(demo_clip), curated, ["imagenet", "cifar10"], "single").metrics["zeroshot"]
    for name in ("imagenet", "cifar10"):
        dataset, loader = clip_benchmark_loader(curated, name, "test", preprocess, "zeroshot_classification")
        assert dataset.templates == [SINGLE_PROMPT.format("{c}")]
        classifier = cb.zero_shot_classifier(
            net, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False
        )
        logits, target = cb.run_classification(net, classifier, loader, "cpu", amp=False)
        top = logits.topk(5, dim=1).indices
        assert len(target) == ours[name]["images"]
        assert ours[name]["top1"] == round((top[:, 0] == target).float().mean().item(), 4)
        assert ours[name]["top5"] == round((top == target[:, None]).any(1).float().mean().item(), 4)
        balanced = balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy())
        assert ours[name]["mean_per_class_recall"] == round(float(balanced), 4)

"""pipeline.report: gains, relative gains and retention, exact on hand-made metrics."""

from __future__ import annotations

import pytest

from pipeline.report import compare, to_markdown


def retrieval(r1: float, mrr: float) -> dict:
    return {"R@1": r1, "R@5": 0.5, "R@10": 0.6, "mAP": 0.3, "MRR": mrr}


BASE = {
    "retrieval": {
        "coco": {
            "images": 5000,
            "captions": 25000,
            "text_to_image": retrieval(0.30, 0.40),
            "image_to_text": retrieval(0.50, 0.60),
            "chance": {"text_to_image": {"R@1": 0.0002}, "image_to_text": {"R@1": 0.001}},
        }
    },
    "zeroshot": {
        "imagenet": {
            "images": 50000,
            "classes": 1000,
            "top1": 0.60,
            "top5": 0.80,
            "mean_per_class_recall": 0.6,
        },
        "cifar10": {"images": 10000, "classes": 10, "top1": 0.0, "top5": 0.5, "mean_per_class_recall": 0.0},
    },
}
STUDENT = {
    "retrieval": {
        "coco": {
            "images": 5000,
            "captions": 25000,
            "text_to_image": retrieval(0.36, 0.40),
            "image_to_text": retrieval(0.45, 0.60),
        }
    },
    "zeroshot": {
        "imagenet": {
            "images": 50000,
            "classes": 1000,
            "top1": 0.57,
            "top5": 0.80,
            "mean_per_class_recall": 0.6,
        }
    },
}


def rows(report: dict, kind: str, **match) -> list[dict]:
    return [r for r in report[kind] if all(r[k] == v for k, v in match.items())]


def test_gains_and_retention():
    report = compare({"base": BASE, "student": STUDENT})
    assert report["reference"] == "base" and report["models"] == ["base", "student"]
    assert len(report["retrieval"]) == 2 * 5 and len(report["zeroshot"]) == 2 * 3
    [t2i] = rows(report, "retrieval", direction="text_to_image", metric="R@1")
    assert t2i["values"] == {"base": 0.30, "student": 0.36}
    assert t2i["gain"] == {"student": pytest.approx(0.06)}
    assert t2i["relative_gain"] == {"student": pytest.approx(0.2)}
    assert t2i["chance"] == 0.0002 and t2i["images"] == 5000 and "retention" not in t2i
    [i2t] = rows(report, "retrieval", direction="image_to_text", metric="R@1")
    assert (i2t["gain"]["student"], i2t["relative_gain"]["student"]) == pytest.approx((-0.05, -0.1))
    [top1] = rows(report, "zeroshot", dataset="imagenet", metric="top1")
    assert top1["retention"] == {"student": pytest.approx(0.95)}
    assert top1["gain"] == {"student": pytest.approx(-0.03)}
    # A set the student lacks, and a reference of 0: no made-up numbers.
    [cifar] = rows(report, "zeroshot", dataset="cifar10", metric="top5")
    assert cifar["values"]["student"] is None and cifar["gain"]["student"] is None
    [zero] = rows(report, "zeroshot", dataset="cifar10", metric="top1")
    assert zero["relative_gain"]["student"] is None and zero["retention"]["student"] is None
    assert report["summary"] == {"student": {"mean_zero_shot_top1_retention": pytest.approx(0.95)}}


def test_the_reference_alone():
    report = compare({"base": BASE})
    assert report["summary"] == {}
    assert all(r["gain"] == {} for r in report["retrieval"])


def test_markdown_tables():
    md = to_markdown(compare({"base": BASE, "student": STUDENT}))
    assert md.startswith("# Evaluation report\n")
    assert "| data set | direction | metric | chance | base | student | Δ student | Δ% student |" in md
    assert (
        "| COCO test (5000 images, 25000 captions) | text→image | R@1 | 0.02 | 30.00 | 36.00 | +6.00 | +20.00 |"
        in md
    )
    assert "| ImageNet (50000 images, 1000 classes) | top1 | – | 60.00 | 57.00 | -3.00 | 0.950 |" in md
    assert "| CIFAR-10 (10000 images, 10 classes) | top5 | – | 50.00 | – | – | – |" in md
    assert "Mean zero-shot top-1 retention of `student`: 0.950." in md


def test_nothing_to_report():
    with pytest.raises(ValueError, match="no model"):
        compare({})


def test_probe_rows_and_table():
    base = {
        "probe": {
            "sugarcrepe": {
                "items": {"swap_att": 200, "add_obj": 200},
                "chance": 0.5,
                "accuracy": {"add_obj": 0.9, "swap_att": 0.5, "mean": 0.7},
                "text_cosine": {"add_obj": 0.6, "swap_att": 0.995, "mean": 0.7975},
            }
        }
    }
    student = {
        "probe": {
            "sugarcrepe": {
                "items": {"swap_att": 200, "add_obj": 200},
                "chance": 0.5,
                "accuracy": {"add_obj": 0.9, "swap_att": 0.6, "mean": 0.75},
            }
        }
    }
    report = compare({"base": base, "student": student})
    rows = {r["category"]: r for r in report["probe"]}
    assert rows["swap_att"]["gain"]["student"] == pytest.approx(0.1)
    assert rows["mean"]["items"] == 400 and rows["add_obj"]["items"] == 200
    md = to_markdown(report)
    assert "## Compositional probe" in md
    # The text side's ceiling beside the accuracies: swap_att's captions are one point to it.
    assert rows["swap_att"]["text_cosine"] == 0.995
    assert "| SugarCrepe | swap_att | 200 | 50.00 | 0.995 | 50.00 | 60.00 | +10.00 |" in md
    assert "no image embedding" in md


def test_clip_benchmark_rows_beside_the_project_s_own():
    base = {
        "retrieval": {
            "coco": {
                "images": 5,
                "captions": 25,
                "image_to_text": {"R@1": 0.4, "clip_benchmark": {"R@1": 0.6}},
            }
        }
    }
    report = compare({"base": base, "student": base})
    got = [
        (r["direction"], r["metric"], r["values"]["base"])
        for r in report["retrieval"]
        if r["values"]["base"] is not None
    ]
    assert got == [("image_to_text", "R@1", 0.4), ("image_to_text", "R@1 (CLIP_benchmark)", 0.6)]
    # Metrics written before the CLIP_benchmark figures: no such rows at all.
    old = {"retrieval": {"coco": {"images": 5, "captions": 25, "image_to_text": {"R@1": 0.4}}}}
    assert not [r for r in compare({"base": old})["retrieval"] if "CLIP_benchmark" in r["metric"]]
    assert "R@k (CLIP_benchmark) counts the k candidates torch.topk returns" in to_markdown(report)

"""Side-by-side report of evaluated models, like the paper's Tables 2 and 3: every model against
a reference (the base CLIP) per data set and direction, with the absolute gain, the relative gain
and, for zero-shot classification, the retention (model ÷ reference).

Input: the `metrics/<model>.json` dicts written by the evaluate stage; output: a JSON-ready dict
and its Markdown rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DIRECTIONS = {"text_to_image": "text→image", "image_to_text": "image→text"}
# R@k as CLIP_benchmark's code counts it (torch.topk): the figures to set beside published ones.
# (The project's R@k places ties against the model, so they never flatter it.)
CLIP_BENCHMARK = "clip_benchmark"
RETRIEVAL_ROWS = [
    *((m, (m,)) for m in ("R@1", "R@5", "R@10")),
    *((f"{m} (CLIP_benchmark)", (CLIP_BENCHMARK, m)) for m in ("R@1", "R@5", "R@10")),
    *((m, (m,)) for m in ("mAP", "MRR")),
]


def value_at(tree: Mapping, path: Sequence[str]) -> float | None:
    """The value under the keys `path` of a metrics JSON, None where any key is missing."""
    node = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node  # type: ignore[return-value]


ZEROSHOT_METRICS = ("top1", "top5", "mean_per_class_recall")
NAMES = {
    "coco_val": "COCO val",
    "flickr30k_val": "Flickr30k val",
    "coco": "COCO test",
    "flickr30k": "Flickr30k test",
    "imagenet": "ImageNet",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "sugarcrepe": "SugarCrepe",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def _row(values: dict[str, float | None], reference: str, retention: bool) -> dict:
    base = values[reference]
    others = {m: v for m, v in values.items() if m != reference}
    row = {
        "values": values,
        "gain": {m: None if v is None or base is None else round(v - base, 4) for m, v in others.items()},
        "relative_gain": {
            m: None if v is None or not base else round((v - base) / base, 4) for m, v in others.items()
        },
    }
    if retention:
        row["retention"] = {m: _ratio(v, base) for m, v in others.items()}
    return row


def compare(results: Mapping[str, dict]) -> dict:
    """Rows for every (data set, direction, metric) of the reference, the first model given; a
    model lacking a value gets null, and so do its gains."""
    if not results:
        raise ValueError("no model to report on")
    models = list(results)
    reference = results[models[0]]
    report: dict = {
        "reference": models[0],
        "models": models,
        "retrieval": [],
        "zeroshot": [],
        "probe": [],
        "summary": {},
    }
    for name, ref in reference.get("retrieval", {}).items():
        for direction in DIRECTIONS:
            for metric, path in RETRIEVAL_ROWS:
                values = {m: value_at(results[m], ("retrieval", name, direction, *path)) for m in models}
                if path[0] == CLIP_BENCHMARK and all(v is None for v in values.values()):
                    continue  # metrics written before the convention was reported
                report["retrieval"].append(
                    {
                        "dataset": name,
                        "images": ref["images"],
                        "captions": ref["captions"],
                        "direction": direction,
                        "metric": metric,
                        "chance": ref.get("chance", {}).get(direction, {}).get(path[-1]),
                        **_row(values, models[0], retention=False),
                    }
                )
    for name, ref in reference.get("zeroshot", {}).items():
        for metric in ZEROSHOT_METRICS:
            values = {m: results[m].get("zeroshot", {}).get(name, {}).get(metric) for m in models}
            report["zeroshot"].append(
                {
                    "dataset": name,
                    "images": ref["images"],
                    "classes": ref["classes"],
                    "metric": metric,
                    "chance": ref.get("chance", {}).get(metric),
                    **_row(values, models[0], retention=True),
                }
            )
    for name, ref in reference.get("probe", {}).items():
        for category in ref["accuracy"]:
            values = {
                m: results[m].get("probe", {}).get(name, {}).get("accuracy", {}).get(category) for m in models
            }
            report["probe"].append(
                {
                    "dataset": name,
                    "category": category,
                    "items": ref["items"].get(category, sum(ref["items"].values())),
                    "chance": ref.get("chance"),
                    # The text side's ceiling (the same for every model: the text tower is frozen).
                    "text_cosine": ref.get("text_cosine", {}).get(category),
                    **_row(values, models[0], retention=False),
                }
            )
    for m in models[1:]:
        kept = [r["retention"][m] for r in report["zeroshot"] if r["metric"] == "top1"]
        kept = [k for k in kept if k is not None]
        report["summary"][m] = {
            "mean_zero_shot_top1_retention": round(sum(kept) / len(kept), 4) if kept else None
        }
    return report


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def _times(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _table(header: list[str], rows: list[list[str]], numeric_from: int) -> list[str]:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in [header, align, *rows]]


def to_markdown(report: dict) -> str:
    """The report as Markdown tables, values in percent."""
    ref, others = report["reference"], report["models"][1:]
    lines = [
        "# Evaluation report",
        "",
        f"Reference: `{ref}`. Values in percent. Δ: gain over the reference in percentage points; "
        "Δ%: gain relative to the reference; retention: model ÷ reference. Chance: a random ranking. "
        "R@k places a candidate that ties with a positive above it (a tie never flatters a model); "
        "R@k (CLIP_benchmark) counts the k candidates torch.topk returns, as CLIP_benchmark's code "
        "and published figures do. They differ where scores tie exactly (a caption repeated across "
        "images).",
        "",
    ]
    if report["retrieval"]:
        header = ["data set", "direction", "metric", "chance", ref]
        header += [h for m in others for h in (m, f"Δ {m}", f"Δ% {m}")]
        rows = []
        for r in report["retrieval"]:
            row = [
                f"{NAMES.get(r['dataset'], r['dataset'])} ({r['images']} images, {r['captions']} captions)",
                DIRECTIONS[r["direction"]],
                r["metric"],
                _pct(r["chance"]),
                _pct(r["values"][ref]),
            ]
            for m in others:
                row += [_pct(r["values"][m]), _pct(r["gain"][m], True), _pct(r["relative_gain"][m], True)]
            rows.append(row)
        lines += [
            "## Retrieval (Karpathy val: where choices are made; Karpathy test: the readout)",
            "",
            *_table(header, rows, 3),
            "",
        ]
    if report["zeroshot"]:
        header = ["data set", "metric", "chance", ref]
        header += [h for m in others for h in (m, f"Δ {m}", f"retention {m}")]
        rows = []
        for r in report["zeroshot"]:
            row = [
                f"{NAMES.get(r['dataset'], r['dataset'])} ({r['images']} images, {r['classes']} classes)",
                r["metric"],
                _pct(r["chance"]),
                _pct(r["values"][ref]),
            ]
            for m in others:
                row += [_pct(r["values"][m]), _pct(r["gain"][m], True), _times(r["retention"][m])]
            rows.append(row)
        lines += ["## Zero-shot classification", "", *_table(header, rows, 2), ""]
    if report.get("probe"):
        header = ["probe", "category", "items", "chance", "text cos(pos, neg)", ref]
        header += [h for m in others for h in (m, f"Δ {m}")]
        rows = []
        for r in report["probe"]:
            row = [NAMES.get(r["dataset"], r["dataset"]), r["category"], str(r["items"]), _pct(r["chance"])]
            row += [_times(r.get("text_cosine")), _pct(r["values"][ref])]
            for m in others:
                row += [_pct(r["values"][m]), _pct(r["gain"][m], True)]
            rows.append(row)
        lines += [
            "## Compositional probe (accuracy: true caption above its hard negative)",
            "",
            "text cos(pos, neg): the mean cosine of the true caption and its negative in the frozen "
            "text tower. Near 1 the text side holds the two as one point, and no image embedding — "
            "base, student or any image-side training — can separate them: those categories stay "
            "at chance by construction, not for want of a better teacher.",
            "",
        ]
        lines += [*_table(header, rows, 2), ""]
    for m, s in report["summary"].items():
        lines.append(
            f"Mean zero-shot top-1 retention of `{m}`: {_times(s['mean_zero_shot_top1_retention'])}."
        )
    return "\n".join(lines).rstrip() + "\n"

"""The paper's ablations (its Table 4) as data — each a set of params overrides — and the table
built from their evaluation metrics.

Rows: the base CLIP for reference, the full method, then one row per ablation, each removing one
component. Every variant is the full method with its overrides applied; the overrides of `full`
are the settings of the method itself, so an ablation run sets them too and differs from the full
method in exactly its own keys, whatever the workspace's params say.

The paper's wording leaves two rows open; the choices, and why:
- "no bidirectional attention" keeps ONE direction of cross-attention: caption tokens attend to
  the regions (`text_to_regions`), the regions→text layer is removed. Of the two directions it is
  the one through which the region weights act as an attention prior (they still bias the region
  pooling too), so the row removes the second direction and nothing else; and text querying image
  regions is the usual one-way cross-modal attention.
- "no cross-modal attention" removes BOTH directions (`attention: none`): the teacher embedding is
  the weighted mean of the region embeddings plus the mean of the caption token embeddings, each
  through its trainable input map — the same inputs, no exchange between the modalities.
Other rows: "no YOLO" keeps the whole image as the teacher's only region (region 0, which embed
always writes), so detect and embed are reused untouched; "no teacher" is λ_cos = 0, the student
trained by its contrastive term alone on the same data (distill and what follows re-run only).
`no_region_weights` is not in the paper: the authors' code computed region weights and never
applied them, so this row measures what applying them (this project's fix) is worth.

Input of the table: `{variant name: metrics dict as written by the evaluate stage}` (`base` for
the base CLIP); a variant that is absent or None is reported as missing, with the command that
makes it. Output: a JSON-ready dict and its Markdown rendering. Nothing here knows of DVC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

REFERENCE = "base"  # the base CLIP's row: the evaluate stage's metrics/base.json
FULL = "full"  # the full method: the workspace's own run


@dataclass(frozen=True)
class Ablation:
    name: str  # the experiment's name (`dvc exp run -n`)
    label: str  # the row's label in the table
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted params key → value
    paper: bool = True  # a row of the paper's Table 4 (False: an extra row of this project)


ABLATIONS: tuple[Ablation, ...] = (
    Ablation(
        FULL,
        "DCLIP (full)",
        {"teacher.regions": "yolo", "teacher.attention": "bidirectional", "teacher.region_weights": True},
    ),
    Ablation("no_yolo", "w/o YOLO regions (whole image)", {"teacher.regions": "whole_image"}),
    Ablation(
        "no_bidirectional",
        "w/o bidirectional attention (text→regions only)",
        {"teacher.attention": "text_to_regions"},
    ),
    Ablation("no_cross_attention", "w/o cross-modal attention", {"teacher.attention": "none"}),
    Ablation("no_teacher", "w/o teacher (λ_cos = 0)", {"distill.lambda_cos": 0.0}),
    Ablation("no_region_weights", "w/o region weights", {"teacher.region_weights": False}, paper=False),
)
BY_NAME: dict[str, Ablation] = {a.name: a for a in ABLATIONS}
REFERENCE_LABEL = "CLIP (base)"


def resolve(names: Iterable[str] | None = None) -> list[Ablation]:
    """The named ablations in table order (all of them for none); an unknown name is an error
    naming the known ones."""
    if not names:
        return list(ABLATIONS)
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [a for a in ABLATIONS if a.name in names]


def overrides(name: str) -> dict[str, Any]:
    """The params a variant runs with: the full method's settings, then its own."""
    return {**BY_NAME[FULL].overrides, **BY_NAME[name].overrides}


def get_dotted(params: Mapping, key: str) -> Any:
    """params["a"]["b"] for "a.b"; KeyError naming the key when it is absent."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def apply_overrides(params: Mapping, changes: Mapping[str, Any]) -> dict:
    """A copy of a params mapping with dotted keys set; a key the params do not have is an error
    (an override never adds a key: a typo must not pass silently)."""

    def copy(node):
        return {k: copy(v) for k, v in node.items()} if isinstance(node, Mapping) else node

    out = copy(params)
    for key, value in changes.items():
        get_dotted(out, key)  # raises KeyError for an unknown key
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[last] = value
    return out


def mismatches(name: str, params: Mapping) -> list[str]:
    """Where a run's params are not those of the variant it is named after (e.g. a workspace whose
    params.yaml itself ablates something, or a hand-made experiment of the same name)."""
    wrong = []
    for key, want in overrides(name).items():
        try:
            got = get_dotted(params, key)
        except KeyError:
            got = "(absent)"
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            wrong.append(f"{key} is {got!r}, not {want!r}")
    if name != "no_teacher":  # every other variant distills from the teacher
        try:
            lam = get_dotted(params, "distill.lambda_cos")
        except KeyError:
            lam = None
        if not isinstance(lam, (int, float)) or lam <= 0:
            wrong.append(f"distill.lambda_cos is {lam!r}: no teacher term, so this is no {name!r} run")
    return wrong


def run_command(name: str) -> str:
    """How to make a missing row."""
    if name == REFERENCE:
        return "dvc repro evaluate@base"
    if name == FULL:
        return "dvc repro dvc.yaml"
    return f"dclip ablations run {name}"


# --- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str  # the cell's key in the JSON rows
    label: str  # the Markdown header
    path: tuple[str, ...]  # where the value is in an evaluate metrics dict


def _retrieval(dataset: str, name: str) -> list[Column]:
    return [
        Column(f"{dataset}_{direction}_{k}", f"{name} {arrow} {k}", ("retrieval", dataset, direction, k))
        for direction, arrow in (("text_to_image", "T→I"), ("image_to_text", "I→T"))
        for k in ("R@1", "R@5")
    ]


# The paper's headline numbers: Karpathy-test R@1 and R@5 in both directions and zero-shot top-1
# (with its retention of the base CLIP's, the paper's "94 %"); SugarCrepe's mean accuracy is this
# project's measure of the claim of finer-grained understanding. Table 4's own header could not be
# checked here (no copy of the paper's body was at hand): the columns are data, change them here
# once compared with the PDF; the rows are the ablations the paper names.
COLUMNS: tuple[Column, ...] = (
    *_retrieval("coco", "COCO"),
    *_retrieval("flickr30k", "Flickr30k"),
    Column("imagenet_top1", "ImageNet top-1", ("zeroshot", "imagenet", "top1")),
    Column("cifar10_top1", "CIFAR-10 top-1", ("zeroshot", "cifar10", "top1")),
    Column("cifar100_top1", "CIFAR-100 top-1", ("zeroshot", "cifar100", "top1")),
    Column("sugarcrepe_mean", "SugarCrepe mean", ("probe", "sugarcrepe", "accuracy", "mean")),
)
ZEROSHOT_TOP1 = tuple(c for c in COLUMNS if c.path[0] == "zeroshot" and c.path[-1] == "top1")
RETENTION = Column("zeroshot_top1_retention", "zero-shot retention", ())


def cell(metrics: Mapping | None, path: Sequence[str]) -> float | None:
    node: Any = metrics
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def retention(metrics: Mapping | None, reference: Mapping | None) -> float | None:
    """The mean over zero-shot data sets of top-1 ÷ the base CLIP's top-1 (data sets where the
    base scores 0 or either value is absent are left out)."""
    ratios = []
    for c in ZEROSHOT_TOP1:
        v, b = cell(metrics, c.path), cell(reference, c.path)
        if v is not None and b:
            ratios.append(v / b)
    return round(sum(ratios) / len(ratios), 4) if ratios else None


def table(
    results: Mapping[str, Mapping | None],
    names: Iterable[str] | None = None,
    params: Mapping[str, Mapping] | None = None,
    baseline: str | None = None,
) -> dict:
    """The Table 4 layout of `results` ({variant: evaluate metrics}, `base` the reference): a row
    per variant of `names` (default: all) after the base CLIP's. A variant without metrics is a
    row marked missing, listed under "missing" with the command that makes it. `params`
    ({variant: its params mapping}, where known) adds a warning for each run whose params are not
    its variant's. A column that no present row has a value for (a data set nobody evaluated) is
    left out and named under "columns_without_values"."""
    variants = [a.name for a in resolve(names)]
    params = params or {}
    reference = results.get(REFERENCE)
    rows = []
    for name in [REFERENCE, *variants]:
        metrics = results.get(name)
        present = metrics is not None
        cells = {c.key: cell(metrics, c.path) for c in COLUMNS}
        cells[RETENTION.key] = retention(metrics, reference) if present else None
        row = {
            "name": name,
            "label": REFERENCE_LABEL if name == REFERENCE else BY_NAME[name].label,
            "paper": True if name == REFERENCE else BY_NAME[name].paper,
            "overrides": {} if name == REFERENCE else overrides(name),
            "status": "present" if present else "missing",
            "cells": cells,
            "warnings": mismatches(name, params[name]) if name != REFERENCE and name in params else [],
        }
        if not present:
            row["command"] = run_command(name)
        rows.append(row)
    present_rows = [r for r in rows if r["status"] == "present"]
    columns, empty = [], []
    for c in (*COLUMNS, RETENTION):
        if not present_rows or any(r["cells"][c.key] is not None for r in present_rows):
            columns.append({"key": c.key, "label": c.label})
        else:
            empty.append(c.key)
    for r in rows:
        r["cells"] = {c["key"]: r["cells"][c["key"]] for c in columns}
    missing = [
        {"name": r["name"], "label": r["label"], "command": r["command"]} for r in rows if "command" in r
    ]
    return {
        "baseline": baseline,
        "reference": REFERENCE,
        "columns": columns,
        "columns_without_values": empty,
        "rows": rows,
        "missing": missing,
    }


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def to_markdown(t: dict) -> str:
    """The table as Markdown: values in percent, retention as a ratio; then what is missing (and
    how to make it) and any warnings."""
    lines = [
        "# Ablations (the paper's Table 4 layout)",
        "",
        "Values in percent (Karpathy test splits; zero-shot with the paper's single prompt); zero-shot "
        "retention: mean top-1 of the row ÷ the base CLIP's. `full` is the workspace's run; every other "
        "row is a DVC experiment"
        + (f" of baseline commit `{t['baseline'][:7]}`." if t.get("baseline") else ".")
        + " † not in the paper's table.",
        "",
    ]
    header = ["variant", *(c["label"] for c in t["columns"])]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---", *("---:" for _ in t["columns"])]) + " |")
    for r in t["rows"]:
        label = r["label"] + ("" if r["paper"] else " †")
        values = [
            "–"
            if r["cells"][c["key"]] is None
            else f"{r['cells'][c['key']]:.3f}"
            if c["key"] == RETENTION.key
            else _pct(r["cells"][c["key"]])
            for c in t["columns"]
        ]
        name = "" if r["name"] in (REFERENCE, FULL) else f" (`{r['name']}`)"
        lines.append("| " + " | ".join([label + name, *values]) + " |")
    lines.append("")
    if t["missing"]:
        lines.append(f"**Missing ({len(t['missing'])})** — not found, so their rows are empty:")
        lines.append("")
        lines += [f"- `{m['name']}` ({m['label']}): `{m['command']}`" for m in t["missing"]]
        runnable = [m["name"] for m in t["missing"] if m["name"] not in (REFERENCE, FULL)]
        if len(runnable) > 1:
            lines += ["", f"All of them at once: `dclip ablations run {' '.join(runnable)}`"]
        lines.append("")
    warnings = [(r, w) for r in t["rows"] for w in r["warnings"]]
    if warnings:
        lines.append("**Warnings** — runs whose params are not their variant's:")
        lines.append("")
        lines += [f"- `{r['name']}`: {w}" for r, w in warnings]
        lines.append("")
    if t["columns_without_values"]:
        lines.append(
            "No values (not evaluated): " + ", ".join(f"`{k}`" for k in t["columns_without_values"]) + "."
        )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

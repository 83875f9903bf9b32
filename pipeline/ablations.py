"""The paper's ablations (its Table 4) and this project's extra variants as data — each a set of
params overrides — and the study table built from their evaluations over seeds.

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
`other_captions` and `regions_only` are not in the paper either: teacher targets that are not
conditioned on the pair's own caption (pipeline/teach.py), to learn whether a teacher can carry
anything the contrastive term does not; `strong_teacher` (λ_cos = 5) asks whether the teacher's
pull is simply too weak beside InfoNCE at the paper's λ_cos = 1; `context_crops` gives every
crop a quarter of its size as context on each side, the scale at which the web-pretrained base
reads objects best (`dclip regions-quality`: 90 % shape zero-shot against 60 % for tight crops).

Seeds: a variant run with seed k sets teacher.seed and distill.seed to k (the data, curate's
seed, stays), as experiment `<name>-s<k>`.

The table: per variant and seed, the evaluate stage's per-query outcomes; figures and paired
differences with 95 % intervals from pipeline/study.py. A variant without runs is reported as
missing, with the command that makes it. Nothing here knows of DVC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import study
from pipeline.errors import UsageError
from pipeline.study import Figure, Runs

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
        {
            "teacher.target": "paper",
            "teacher.regions": "yolo",
            "teacher.attention": "bidirectional",
            "teacher.region_weights": True,
            "distill.lambda_cos": 1.0,
            "embed.context_margin": 0.0,
        },
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
    Ablation(
        "other_captions",
        "teacher target: the image's other captions",
        {"teacher.target": "other_captions"},
        paper=False,
    ),
    Ablation(
        "regions_only", "teacher target: regions only, no caption", {"teacher.target": "regions"}, paper=False
    ),
    Ablation(
        "strong_teacher",
        "λ_cos = 5: a stronger pull toward the teacher",
        {"distill.lambda_cos": 5.0},
        paper=False,
    ),
    Ablation(
        "context_crops",
        "crops with 25 % context (as the base saw objects)",
        {"embed.context_margin": 0.25},
        paper=False,
    ),
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
        raise UsageError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [a for a in ABLATIONS if a.name in names]


SEED_KEYS = ("teacher.seed", "distill.seed")


def overrides(name: str, seed: int | None = None) -> dict[str, Any]:
    """The params a variant runs with: the full method's settings, then its own, then the seed
    (None: the workspace's)."""
    out = {**BY_NAME[FULL].overrides, **BY_NAME[name].overrides}
    if seed is not None:
        out.update({key: seed for key in SEED_KEYS})
    return out


def run_name(name: str, seed: int) -> str:
    """The experiment of a variant's seed."""
    return f"{name}-s{seed}"


def parse_run_name(run: str) -> tuple[str, int] | None:
    """(variant, seed) of an experiment named by run_name, None for any other name."""
    name, sep, seed = run.rpartition("-s")
    if sep and name in BY_NAME and seed.isdigit():
        return name, int(seed)
    return None


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


def mismatches(name: str, params: Mapping, seed: int | None = None) -> list[str]:
    """Where a run's params are not those of the variant (and seed) it is named after (e.g. a
    workspace whose params.yaml itself ablates something, or a hand-made experiment of the same
    name)."""
    wrong = []
    for key, want in overrides(name, seed).items():
        try:
            got = get_dotted(params, key)
        except KeyError:
            got = "(absent)"
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            wrong.append(f"{key} is {got!r}, not {want!r}")
    return wrong


def run_command(name: str, seeds: int = 1) -> str:
    """How to make a missing row."""
    if name == REFERENCE:
        return "dvc repro evaluate@base"
    return f"dclip ablations run {name} --seeds {seeds}"


# --- the study table ---------------------------------------------------------------------------


def _retrieval_figures(dataset: str, label: str, ks: tuple[int, ...]) -> list[Figure]:
    return [
        Figure(f"{dataset}_{short}_R@{k}", f"{label} {arrow} R@{k}", dataset, task, k)
        for task, short, arrow in (("text_to_image", "t2i", "T→I"), ("image_to_text", "i2t", "I→T"))
        for k in ks
    ]


# Validation: where choices are made. Test: the readout. Then what fine-tuning may cost (zero-shot,
# drawn like the base's pretraining data) and the claim of finer-grained understanding (the probe).
VAL_FIGURES = (
    *_retrieval_figures("coco_val", "COCO val", (1,)),
    *_retrieval_figures("flickr30k_val", "Flickr30k val", (1,)),
)
TEST_FIGURES = (
    *_retrieval_figures("coco", "COCO", (1, 5)),
    *_retrieval_figures("flickr30k", "Flickr30k", (1, 5)),
)
ZEROSHOT_FIGURES = tuple(
    Figure(f"{name}_top1", f"{label} top-1", name, "zero_shot")
    for name, label in (("imagenet", "ImageNet"), ("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"))
)
PROBE_FIGURES = (Figure("sugarcrepe_mean", "SugarCrepe mean", "sugarcrepe", "probe"),)
SECTIONS = (
    ("Validation (Karpathy val: where every choice is made)", VAL_FIGURES),
    ("Test (Karpathy test: the readout)", TEST_FIGURES),
    (
        "Zero-shot (drawn like the base's pretraining data) and the compositional probe",
        (*ZEROSHOT_FIGURES, *PROBE_FIGURES),
    ),
)
FIGURES = tuple(f for _, figs in SECTIONS for f in figs)
RETENTION_KEY = "zeroshot_top1_retention"


def figure_places(queries: pa.Table, figure: Figure) -> tuple[np.ndarray, np.ndarray] | None:
    """(places, strata) of a figure's queries in query order, or None when the run lacks them."""
    dataset = np.asarray(queries.column("dataset").to_pylist())
    task = np.asarray(queries.column("task").to_pylist())
    pick = np.flatnonzero((dataset == figure.dataset) & (task == figure.task))
    if not len(pick):
        return None
    order = pick[np.argsort(np.asarray(queries.column("query").to_pylist())[pick], kind="stable")]
    places = np.asarray(queries.column("place").to_pylist())[order]
    category = queries.column("category").to_pylist()
    strata = np.asarray(["" if category[i] is None else category[i] for i in order])
    return places, strata


def _runs(variant_queries: Mapping[int, pa.Table], figure: Figure) -> Runs | None:
    found = [f for _, q in sorted(variant_queries.items()) if (f := figure_places(q, figure)) is not None]
    if not found:
        return None
    return Runs(np.stack([p for p, _ in found]), found[0][1])


def study_table(
    queries: Mapping[str, Mapping[int, pa.Table]],
    names: Iterable[str] | None = None,
    params: Mapping[str, Mapping[int, Mapping]] | None = None,
    baseline: str | None = None,
    seeds_asked: int = 1,
    replicates: int = study.REPLICATES,
) -> dict:
    """The study of `queries` ({variant: {seed: its queries table}}, `base` the reference with one
    run): a row per variant of `names` (default: all) after the base CLIP's; per figure the mean
    over seeds, the per-seed values and a 95 % interval, and each variant's paired difference
    from the base and from `full` (interval, significant or not). A variant without runs is a
    row marked missing, listed under "missing" with the command that makes it. `params`
    ({variant: {seed: its params}}, where known) adds a warning for each run whose params are not
    its variant's and seed's."""
    variants = [a.name for a in resolve(names)]
    params = params or {}
    rows = []
    for name in [REFERENCE, *variants]:
        runs = queries.get(name) or {}
        row: dict[str, Any] = {
            "name": name,
            "label": REFERENCE_LABEL if name == REFERENCE else BY_NAME[name].label,
            "paper": True if name == REFERENCE else BY_NAME[name].paper,
            "overrides": {} if name == REFERENCE else overrides(name),
            "seeds": sorted(runs),
            "status": "present" if runs else "missing",
            "figures": {},
            "warnings": [],
        }
        if name != REFERENCE:
            for seed, p in sorted((params.get(name) or {}).items()):
                row["warnings"] += [f"seed {seed}: {w}" for w in mismatches(name, p, seed)]
        if not runs:
            row["command"] = run_command(name, seeds_asked)
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    present = {r["name"]: queries[r["name"]] for r in rows if r["status"] == "present"}
    references = [n for n in (REFERENCE, FULL) if n in present]
    empty = []
    for k, figure in enumerate(FIGURES):
        figure_runs = {n: r for n, q in present.items() if (r := _runs(q, figure)) is not None}
        if not figure_runs:
            empty.append(figure.key)
            continue
        result = study.compare(figure_runs, figure.k, references, replicates, seed=k)
        for name, value in result.items():
            by_name[name]["figures"][figure.key] = value
    zero = {
        f.dataset: {n: r for n, q in present.items() if (r := _runs(q, f)) is not None}
        for f in ZEROSHOT_FIGURES
    }
    zero = {s: runs for s, runs in zero.items() if REFERENCE in runs}
    if zero:
        for name, value in study.retention(zero, REFERENCE, replicates, seed=len(FIGURES)).items():
            by_name[name]["figures"][RETENTION_KEY] = value
    else:
        empty.append(RETENTION_KEY)
    missing = [
        {"name": r["name"], "label": r["label"], "command": r["command"]} for r in rows if "command" in r
    ]
    return {
        "baseline": baseline,
        "reference": REFERENCE,
        "confidence": study.CONFIDENCE,
        "replicates": replicates,
        "sections": [
            {
                "title": title,
                "figures": [{"key": f.key, "label": f.label} for f in figs if f.key not in empty],
            }
            for title, figs in SECTIONS
        ],
        "figures_without_values": empty,
        "rows": rows,
        "missing": missing,
    }


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _signed(v: float) -> str:
    return f"{100 * v + 0.0:+.1f}".replace("-0.0", "+0.0")  # no negative zero


def _cell(value: dict | None) -> str:
    if value is None:
        return "–"
    lo, hi = value["interval"]
    seeds = len(value.get("seeds", [])) or 1
    spread = f" ±{100 * float(np.std(value['seeds'], ddof=1)):.1f}" if seeds > 1 else ""
    return f"{_pct(value['mean'])} [{_pct(lo)}, {_pct(hi)}]{spread}"


def _diff_cell(value: dict | None, ref: str) -> str:
    d = (value or {}).get("differences", {}).get(ref)
    if d is None:
        return "–"
    lo, hi = d["interval"]
    mark = " **✓**" if d["significant"] else ""
    return f"{_signed(d['mean'])} [{_signed(lo)}, {_signed(hi)}]{mark}"


def _row_label(r: dict) -> str:
    label = r["label"] + ("" if r["paper"] else " †")
    name = "" if r["name"] in (REFERENCE, FULL) else f" (`{r['name']}`)"
    n = len(r["seeds"])
    if r["name"] == REFERENCE:
        return label
    return label + name + (f", {n} seed{'s' * (n != 1)}" if n else ", missing")


def to_markdown(t: dict) -> str:
    """The study as Markdown: per section, the figures with their intervals, then the paired
    differences from the base CLIP and from `full`; then what is missing and any warnings."""
    pct = int(round(100 * t["confidence"]))
    lines = [
        "# The study: DCLIP's variants over seeds, with intervals",
        "",
        f"Values in percent: mean over seeds [{pct} % interval] ±standard deviation over seeds. "
        f"Intervals: a two-level bootstrap ({t['replicates']} replicates) over the queries and the "
        "seeds (pipeline/study.py). Differences are paired on the same queries; **✓** marks an "
        "interval that excludes zero — any other difference is no difference. "
        + (f"Experiments of baseline commit `{t['baseline'][:7]}`. " if t.get("baseline") else "")
        + "† not in the paper's table.",
        "",
    ]
    present = [r for r in t["rows"] if r["status"] == "present"]
    for section in t["sections"]:
        figs = section["figures"]
        if section["title"].startswith("Zero-shot"):
            figs = [*figs, {"key": RETENTION_KEY, "label": "zero-shot retention"}]
        if not figs:
            continue
        lines += [f"## {section['title']}", ""]
        header = ["variant", *(f["label"] for f in figs)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| " + " | ".join(["---", *("---:" for _ in figs)]) + " |")
        for r in t["rows"]:
            cells = []
            for f in figs:
                value = r["figures"].get(f["key"])
                if f["key"] == RETENTION_KEY and value is not None:
                    lo, hi = value["interval"]
                    cells.append(f"{value['mean']:.3f} [{lo:.3f}, {hi:.3f}]")
                else:
                    cells.append(_cell(value))
            lines.append("| " + " | ".join([_row_label(r), *cells]) + " |")
        lines.append("")
        for ref, title in ((REFERENCE, "the base CLIP"), (FULL, "`full`")):
            others = [r for r in present if r["name"] not in (ref, REFERENCE)]
            if not any(
                any(ref in (r["figures"].get(f["key"]) or {}).get("differences", {}) for f in figs)
                for r in others
            ):
                continue
            figs_d = [f for f in figs if f["key"] != RETENTION_KEY]
            lines += [f"Difference from {title}, percentage points:", ""]
            lines.append("| " + " | ".join(["variant", *(f["label"] for f in figs_d)]) + " |")
            lines.append("| " + " | ".join(["---", *("---:" for _ in figs_d)]) + " |")
            for r in others:
                cells = [_diff_cell(r["figures"].get(f["key"]), ref) for f in figs_d]
                lines.append("| " + " | ".join([_row_label(r), *cells]) + " |")
            lines.append("")
    if t["missing"]:
        lines.append(f"**Missing ({len(t['missing'])})** — no runs found, so their rows are empty:")
        lines.append("")
        lines += [f"- `{m['name']}` ({m['label']}): `{m['command']}`" for m in t["missing"]]
        lines.append("")
    warnings = [(r, w) for r in t["rows"] for w in r["warnings"]]
    if warnings:
        lines.append("**Warnings** — runs whose params are not their variant's:")
        lines.append("")
        lines += [f"- `{r['name']}`: {w}" for r, w in warnings]
        lines.append("")
    if t["figures_without_values"]:
        lines.append(
            "No values (not evaluated): " + ", ".join(f"`{k}`" for k in t["figures_without_values"]) + "."
        )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

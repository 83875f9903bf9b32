"""The study report as one self-contained HTML page (metrics/report.html): nothing on it loads from
the network, so it opens offline, in a mail attachment or from a DVC remote.

On the page: the study's tables with their intervals (metrics/ablations.json, when the study has
been run) and where the ablations separate; the models side by side (the evaluation report);
recall@k curves per data set and direction; the teacher's and the student's training curves; the
compositional probe per category beside its text-side ceiling; and the retrieval gallery
(pipeline/gallery.py) with the images inlined. Plots are matplotlib SVG written into the page,
text left as text; the same inputs give the same bytes.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import evalsets, gallery, images
from pipeline.report import DIRECTIONS, NAMES
from pipeline.shards import read_shard

THUMB_SIDE = 112  # px, the longer side of a gallery image
SAMPLE = 200  # captions in the gallery's seeded sample
PER_GROUP = 4  # examples shown per group
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


@dataclass
class GalleryView:
    """A gallery with what it shows: captions, true images, both models' top images, thumbnails."""

    gallery: gallery.Gallery
    models: tuple[str, str]
    captions: dict[int, str]
    true_image: dict[int, int]
    top: dict[str, dict[int, tuple[int, ...]]]  # model → query → its top image indices
    thumbs: dict[int, str]  # image index → data URI


@dataclass
class Page:
    report: dict  # pipeline.report.compare()
    study: dict | None = None  # metrics/ablations.json
    recall: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model → column → by k
    training: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    galleries: list[GalleryView] = field(default_factory=list)


# --- reading what the stages wrote ---------------------------------------------------------------------


def read_recall(path: Path) -> dict[str, list[float]]:
    """metrics/recall/<model>.csv: one column per (set, direction), a row per k = 1 …"""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: [float(r[c]) for r in rows] for c in (rows[0] if rows else {}) if c != "k"}


def read_live(folder: Path) -> dict[str, list[tuple[float, float]]]:
    """A DVCLive plots folder: one TSV per metric, (step, value) rows."""
    out = {}
    for tsv in sorted(folder.glob("*.tsv")):
        with open(tsv, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))[1:]
        out[tsv.stem] = [(float(r[0]), float(r[1])) for r in rows]
    return out


def gallery_view(
    curated: Path, dataset: str, queries: Mapping[str, Sequence[Mapping]], models: tuple[str, str]
) -> GalleryView:
    """The gallery of one retrieval test set between `models` (reference, other), from their
    queries tables' rows, with the curated set's captions and images."""
    rows = pq.read_table(
        evalsets.manifest(curated, dataset), columns=["key", "shard", "captions"]
    ).to_pylist()
    captions = [(i, c) for i, r in enumerate(rows) for c in r["captions"]]
    base, other = (gallery.outcomes(queries[m], dataset) for m in models)
    g = gallery.build(dataset, base, other, SAMPLE, PER_GROUP)
    shown = [q for qs in g.shown.values() for q in qs]
    top = {m: {q: o[q].top for q in shown} for m, o in zip(models, (base, other))}
    true_image = {q: captions[q][0] for q in shown}
    needed = {i for q in shown for i in (true_image[q], *top[models[0]][q], *top[models[1]][q])}
    return GalleryView(
        gallery=g,
        models=models,
        captions={q: captions[q][1] for q in shown},
        true_image=true_image,
        top=top,
        thumbs=_thumbnails(curated, rows, needed),
    )


def thumbnail_uri(image: Any, side: int = THUMB_SIDE) -> str:
    """A PIL image as an inline JPEG data URI, its longer side at most `side` (the report's
    gallery, `dclip search`'s contact sheet)."""
    im = image.convert("RGB")
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnails(curated: Path, rows: list[dict], needed: set[int]) -> dict[int, str]:
    wanted = {rows[i]["key"]: i for i in needed}
    shards = sorted({rows[i]["shard"] for i in needed})
    out = {}
    for shard in shards:
        for key, sample in read_shard(curated / shard):
            if key not in wanted:
                continue
            img = images.decode_sample(sample)
            if isinstance(img, images.Reject):
                raise ValueError(f"{curated / shard}: sample {key!r}: {img.reason}: {img.detail}")
            out[wanted[key]] = thumbnail_uri(img)
    missing = set(wanted.values()) - set(out)
    if missing:
        raise ValueError(f"{curated}: images {sorted(missing)[:5]} of the gallery are not in their shards")
    return out


# --- plots ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float, panels: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update({"svg.hashsalt": "dclip", "svg.fonttype": "none", "font.size": 9})
    fig, axes = plt.subplots(1, panels, figsize=(width, height), squeeze=False)
    return fig, axes[0]


def _svg(fig: Any, name: str, caption: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML declaration and doctype are not for inline SVG
    text = html.escape(caption)
    return f'<figure class="plot" data-plot="{name}">{svg}<figcaption>{text}</figcaption></figure>'


def recall_plots(recall: Mapping[str, Mapping[str, list[float]]]) -> list[str]:
    """Recall@k against k, one figure per data set, a panel per direction, a line per model."""
    out = []
    sets = list(dict.fromkeys(c.rsplit("_", 3)[0] for cols in recall.values() for c in cols))
    for name in sets:
        fig, axes = _figure(7.0, 2.6, 2)
        for ax, direction in zip(axes, DIRECTIONS):
            for colour, (model, cols) in zip(COLOURS, recall.items()):
                ys = cols.get(f"{name}_{direction}")
                if ys:
                    ax.plot(range(1, len(ys) + 1), [100 * y for y in ys], color=colour, label=model)
            ax.set(
                title=f"{NAMES.get(name, name)} {DIRECTIONS[direction]}", xlabel="k", ylabel="recall@k (%)"
            )
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend()
        out.append(_svg(fig, f"recall-{name}", f"{NAMES.get(name, name)}: recall@k, k = 1 … 50"))
    return out


TRAINING = {
    "teacher": (
        ("train_total", "val_loss"),
        ("val_unseen_t2i_R@1", "val_base_t2i_R@1", "val_unseen_i2t_R@1", "val_base_i2t_R@1"),
    ),
    "distill": (("total", "contrastive", "teacher_cos"),),
}
X_LABELS = {"teacher": "epoch", "distill": "optimiser step"}


def training_plots(training: Mapping[str, Mapping[str, list[tuple[float, float]]]]) -> list[str]:
    out = []
    for stage, panels in TRAINING.items():
        curves = training.get(stage, {})
        groups = [[m for m in group if m in curves] for group in panels]
        groups = [g for g in groups if g]
        if not groups:
            continue
        fig, axes = _figure(3.6 * len(groups), 2.6, len(groups))
        for ax, group in zip(axes, groups):
            for colour, metric in zip(COLOURS, group):
                steps, values = zip(*curves[metric])
                xs = (
                    [s + 1 for s in steps] if stage == "teacher" else list(steps)
                )  # DVCLive counts epochs from 0
                ax.plot(xs, values, color=colour, label=metric, marker="o" if stage == "teacher" else None)
            ax.set(
                xlabel=X_LABELS[stage], ylabel="loss" if "loss" in group[0] or "total" in group[0] else "R@1"
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        out.append(_svg(fig, f"training-{stage}", f"{stage}: training curves (DVCLive)"))
    return out


def probe_plot(rows: Sequence[Mapping], models: Sequence[str]) -> list[str]:
    """Accuracy per probe category, a bar per model, beside the text side's ceiling: the frozen
    text tower's cosine of caption and negative (near 1: no image embedding can tell them apart)."""
    rows = [r for r in rows if r["category"] != "mean"]
    if not rows:
        return []
    fig, axes = _figure(7.0, 2.8)
    ax = axes[0]
    width = 0.8 / len(models)
    for i, (colour, model) in enumerate(zip(COLOURS, models)):
        xs = [j + i * width for j in range(len(rows))]
        heights = [float("nan") if r["values"][model] is None else 100 * r["values"][model] for r in rows]
        ax.bar(xs, heights, width, color=colour, label=model)  # a model without the figure: no bar
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance")
    labels = [
        f"{r['category']}\ncos {r['text_cosine']:.3f}" if r.get("text_cosine") is not None else r["category"]
        for r in rows
    ]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize=7, ncols=len(models) + 1)
    caption = "Compositional probe per category; under each, the text side's ceiling cos(caption, negative)"
    return [_svg(fig, "probe", caption)]


def study_plot(study: Mapping) -> list[str]:
    """Where the ablations separate: each variant's difference from the full method on the test
    figures, with its 95 % interval (a bar crossing zero is no difference)."""
    section = next((s for s in study["sections"] if s["title"].startswith("Test")), None)
    if section is None:
        return []
    figures = section["figures"][:4]
    rows = [r for r in study["rows"] if r["name"] not in ("base", "full") and r.get("status") == "present"]
    if not rows:
        return []
    fig, axes = _figure(3.0 * len(figures), 0.35 * len(rows) + 1.2, len(figures))
    for ax, fig_spec in zip(axes, figures):
        for y, r in enumerate(rows):
            d = r["figures"].get(fig_spec["key"], {}).get("differences", {}).get("full")
            if d is None:
                continue
            lo, hi = (100 * v for v in d["interval"])
            colour = COLOURS[3] if d["significant"] else COLOURS[0]
            ax.plot([lo, hi], [y, y], color=colour, linewidth=2)
            ax.plot([100 * d["mean"]], [y], "o", color=colour, markersize=4)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(
            range(len(rows)), [r["name"] for r in rows] if ax is axes[0] else [""] * len(rows), fontsize=7
        )
        ax.set(title=fig_spec["label"], xlabel="Δ vs full (points)")
        ax.invert_yaxis()
    return [
        _svg(
            fig, "study", "Each variant minus the full method, 95 % interval; red: the interval excludes zero"
        )
    ]


# --- the page -------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.8em 0;font-size:12px} td,th{border:1px solid #ddd;padding:3px 6px}
td.n{text-align:right;font-variant-numeric:tabular-nums} th{background:#f4f4f4}
figure.plot{margin:1em 0} figure.plot svg{max-width:100%;height:auto}
.sig{color:#b22;font-weight:600} .note{color:#555}
.example{display:grid;grid-template-columns:16em 1fr;gap:.5em;margin:.6em 0;padding:.4em;
 border-top:1px solid #eee}
.row{display:flex;gap:4px;align-items:center;margin:2px 0} .row b{width:5em;font-weight:500}
.row img{height:72px;border:3px solid transparent} .row img.true{border-color:#2a2}
"""


def _pct(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def study_tables(study: Mapping) -> str:
    confidence = round(100 * study["confidence"])
    parts = [
        f'<p class="note">Mean over seeds [{confidence} % interval: a two-level bootstrap, '
        f"{study['replicates']} replicates over queries and seeds] ±sd over seeds, in percent. "
        "Differences are paired on the same queries; a red one's interval excludes zero, any other "
        f"is no difference. Experiments of commit <code>{html.escape(str(study['baseline'])[:7])}</code>.</p>"
    ]
    for section in study["sections"]:
        figures = section["figures"]
        rows = []
        for r in study["rows"]:
            if r.get("status") != "present":
                continue
            cells = [html.escape(r["label"]) + (f" ({len(r['seeds'])} seeds)" if len(r["seeds"]) > 1 else "")]
            for f in figures:
                v = r["figures"].get(f["key"])
                if v is None:
                    cells.append("–")
                    continue
                lo, hi = v["interval"]
                cell = f"{100 * v['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                d = v.get("differences", {}).get("full")
                if d is not None and r["name"] != "base":
                    mark = ' class="sig"' if d["significant"] else ""
                    cell += f"<br><span{mark}>Δ {100 * d['mean']:+.1f}</span>"
                cells.append(cell)
            rows.append(cells)
        parts.append(f"<h3>{html.escape(section['title'])}</h3>")
        parts.append(_table(["variant", *(f["label"] for f in figures)], rows, 1))
    return "".join(parts)


def result_tables(report: Mapping) -> str:
    ref, others = report["reference"], report["models"][1:]
    parts = []
    if report["retrieval"]:
        rows = [
            [
                html.escape(f"{NAMES.get(r['dataset'], r['dataset'])} ({r['images']} images)"),
                DIRECTIONS[r["direction"]],
                html.escape(r["metric"]),
                _pct(r["chance"]),
                _pct(r["values"][ref]),
                *(c for m in others for c in (_pct(r["values"][m]), _pct(r["gain"][m], True))),
            ]
            for r in report["retrieval"]
            if r["metric"] in ("R@1", "R@5", "R@1 (CLIP_benchmark)", "MRR")
        ]
        header = [
            "data set",
            "direction",
            "metric",
            "chance",
            ref,
            *(h for m in others for h in (m, f"Δ {m}")),
        ]
        parts += ["<h3>Retrieval</h3>", _table(header, rows, 3)]
    if report["zeroshot"]:
        rows = [
            [
                html.escape(f"{NAMES.get(r['dataset'], r['dataset'])} ({r['classes']} classes)"),
                r["metric"],
                _pct(r["chance"]),
                _pct(r["values"][ref]),
                *(c for m in others for c in (_pct(r["values"][m]), _pct(r["gain"][m], True))),
            ]
            for r in report["zeroshot"]
        ]
        header = ["data set", "metric", "chance", ref, *(h for m in others for h in (m, f"Δ {m}"))]
        parts += ["<h3>Zero-shot classification</h3>", _table(header, rows, 2)]
    return "".join(parts)


def gallery_section(view: GalleryView) -> str:
    g, (ref, other) = view.gallery, view.models
    name = NAMES.get(g.dataset, g.dataset)
    counts = ", ".join(f"{gallery.TITLES[k]}: {g.counts[k]}" for k in gallery.GROUPS)
    sample = ", ".join(f"{gallery.TITLES[k]}: {g.sample_counts[k]}" for k in gallery.GROUPS)
    parts = [
        f'<h3 data-gallery="{g.dataset}">{html.escape(name)}: text→image</h3>',
        f'<p class="note" data-counts="{html.escape(json.dumps(g.counts))}">All {g.queries} captions — '
        f"{html.escape(counts)}. A seeded sample of {len(g.sample)} — "
        f'<span data-sample-counts="{html.escape(json.dumps(g.sample_counts))}">'
        f"{html.escape(sample)}</span>. "
        f"Right: the caption's image placed first. The true image is framed in green.</p>",
    ]
    for group in gallery.GROUPS:
        if not g.shown[group]:
            continue
        parts.append(f"<h4>{html.escape(gallery.TITLES[group])}</h4>")
        for q in g.shown[group]:
            rows = []
            for model in (ref, other):
                imgs = "".join(
                    f'<img src="{view.thumbs[i]}" alt="image {i}"'
                    + (' class="true"' if i == view.true_image[q] else "")
                    + ">"
                    for i in view.top[model][q]
                )
                rows.append(f'<div class="row"><b>{html.escape(model)}</b>{imgs}</div>')
            parts.append(
                f'<div class="example" data-group="{group}"><div>“{html.escape(view.captions[q])}”</div>'
                f"<div>{''.join(rows)}</div></div>"
            )
    return "".join(parts)


def render(page: Page) -> str:
    """The whole page: one HTML string that needs nothing else."""
    report = page.report
    models = report["models"]
    names = ", ".join(f"<code>{html.escape(m)}</code>" for m in models)
    sections = [f"<h1>DCLIP study report</h1><p>Models: {names} (the first is the reference).</p>"]
    if page.study:
        sections += [
            "<h2>The study: variants over seeds, with intervals</h2>",
            study_tables(page.study),
            *study_plot(page.study),
        ]
    sections += ["<h2>The models side by side</h2>", result_tables(report)]
    if page.recall:
        sections += ["<h2>Recall@k</h2>", *recall_plots(page.recall)]
    if page.training:
        sections += ["<h2>Training</h2>", *training_plots(page.training)]
    if report.get("probe"):
        sections += ["<h2>Compositional probe</h2>", *probe_plot(report["probe"], models)]
    if page.galleries:
        sections += ["<h2>Retrieval gallery</h2>", *(gallery_section(v) for v in page.galleries)]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>DCLIP study report</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )

"""Claims with intervals: figures over seeds and queries, and paired differences between variants.

Input per run (a variant trained with one seed, or the base CLIP): the evaluate stage's queries
table (pipeline/evaluate.py) — each query's place of its best positive, 0 for the top. Every figure
here is a mean over queries of a function of that place (R@k: place < k; zero-shot top-k the
same; a probe item is right at place 0), or for the probe a mean over categories of such means.

Intervals come from a two-level bootstrap, as in the literature on seed variance (e.g. Bouthillier
et al., "Accounting for variance in machine learning benchmarks", 2021): each replicate resamples
the queries (with replacement, within each probe category) and, per variant, its seeds; the figure
is the mean over the resampled seeds of the metric on the resampled queries. The 95 % interval is
the 2.5th–97.5th percentile of the replicates. A difference between two variants uses the same
resampled queries for both (paired: same queries, so the test set's own difficulty cancels) and
each variant's own resampled seeds. A difference whose interval excludes zero is marked
significant; one whose interval holds zero is reported as no difference. With few seeds (three)
the seed part of the bootstrap understates the spread a little ((n-1)/n of the variance), so the
per-seed values are reported beside every figure.

Pure numpy functions: nothing here reads files or knows of DVC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError

CONFIDENCE = 0.95
REPLICATES = 2000


@dataclass(frozen=True)
class Figure:
    """One column of the study: a metric of one (data set, task)."""

    key: str  # e.g. coco_val_t2i_R@1
    label: str  # the column's header
    dataset: str
    task: str  # text_to_image, image_to_text, zero_shot, probe
    k: int = 1  # hit when place < k


@dataclass(frozen=True)
class Runs:
    """One variant's per-query outcomes of one figure: places [seeds, queries] (the same queries,
    in the same order, in every seed) and each query's stratum (probe category; one stratum else)."""

    places: np.ndarray
    strata: np.ndarray

    def __post_init__(self):
        if self.places.ndim != 2 or self.places.shape[1] != len(self.strata) or self.places.shape[0] < 1:
            raise InputError(
                f"places must be [seeds ≥ 1, queries] with one stratum per query, got "
                f"{self.places.shape} and {len(self.strata)} strata"
            )


def hits(places: np.ndarray, k: int) -> np.ndarray:
    return (places < k).astype(np.float64)


def metric(places: np.ndarray, strata: np.ndarray, k: int) -> np.ndarray:
    """The figure per seed: the mean over strata of the hit rate within each stratum ([seeds])."""
    h = hits(np.atleast_2d(places), k)
    return np.mean([h[:, strata == s].mean(axis=1) for s in np.unique(strata)], axis=0)


def query_weights(strata: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap weights [replicates, queries]: within each stratum a multinomial resample of its
    queries, scaled so that a replicate's weighted mean is the mean over strata of stratum means."""
    out = np.zeros((replicates, len(strata)))
    names = np.unique(strata)
    for s in names:
        idx = np.flatnonzero(strata == s)
        counts = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=replicates)
        out[:, idx] = counts / (len(idx) * len(names))
    return out


def seed_means(per_seed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[seeds, replicates] → [replicates]: per replicate, the mean over a resample of the seeds."""
    n_seeds, replicates = per_seed.shape
    pick = rng.integers(n_seeds, size=(replicates, n_seeds))
    return per_seed[pick, np.arange(replicates)[:, None]].mean(axis=1)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def compare(
    runs: Mapping[str, Runs],
    k: int,
    references: Sequence[str],
    replicates: int = REPLICATES,
    seed: int = 0,
) -> dict:
    """Every variant's figure (mean over seeds, per-seed values, 95 % interval) and its paired
    difference from each reference present (interval, and whether it excludes zero).

    All variants must hold the same queries (same count and strata): they were evaluated on the
    same set. Deterministic for a given `seed`."""
    names = list(runs)
    if not names:
        raise InputError("no runs to compare")
    strata = runs[names[0]].strata
    for name in names[1:]:
        if not np.array_equal(runs[name].strata, strata):
            raise InputError(f"{name}: its queries differ from {names[0]}'s; compare runs on the same set")
    rng = np.random.default_rng(seed)
    weights = query_weights(strata, replicates, rng)  # shared: the differences are paired on queries
    boot = {}
    out: dict = {}
    for name in names:
        h = hits(runs[name].places, k)
        per_seed = metric(runs[name].places, strata, k)
        boot[name] = seed_means(h @ weights.T, rng)
        lo, hi = _interval(boot[name])
        out[name] = {
            "mean": float(per_seed.mean()),
            "seeds": [float(v) for v in per_seed],
            "interval": [lo, hi],
            "differences": {},
        }
    for name in names:
        for ref in references:
            if ref == name or ref not in runs:
                continue
            diff = boot[name] - boot[ref]
            lo, hi = _interval(diff)
            out[name]["differences"][ref] = {
                "mean": out[name]["mean"] - out[ref]["mean"],
                "interval": [lo, hi],
                "significant": bool(lo > 0 or hi < 0),
            }
    return out


def retention(
    runs_per_set: Mapping[str, Mapping[str, Runs]],
    reference: str,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> dict:
    """Zero-shot top-1 retention — a variant's top-1 ÷ the reference's, averaged over the zero-shot
    sets — with a bootstrap interval (the same replicates for numerator and denominator)."""
    rng = np.random.default_rng(seed)
    sets = list(runs_per_set)
    variants = [v for v in runs_per_set[sets[0]] if all(v in runs_per_set[s] for s in sets)]
    ratio: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    point: dict[str, list[float]] = {v: [] for v in variants}
    for name in sets:
        runs = runs_per_set[name]
        if reference not in runs:
            raise InputError(f"{name}: no {reference} run to measure retention against")
        strata = runs[reference].strata
        weights = query_weights(strata, replicates, rng)
        boot = {v: seed_means(hits(runs[v].places, 1) @ weights.T, rng) for v in variants}
        means = {v: metric(runs[v].places, strata, 1).mean() for v in variants}
        for v in variants:
            ratio[v].append(boot[v] / np.where(boot[reference] > 0, boot[reference], np.nan))
            point[v].append(means[v] / means[reference] if means[reference] > 0 else np.nan)
    out = {}
    for v in variants:
        # A replicate in which the reference scores 0 on a set has no ratio there: it is left
        # out of that replicate's mean (tiny sets only; real ones never resample to zero).
        stacked = np.stack(ratio[v])
        finite = np.isfinite(stacked)
        counts = finite.sum(axis=0)
        samples = np.where(finite, stacked, 0).sum(axis=0)[counts > 0] / counts[counts > 0]
        lo, hi = _interval(samples)
        points = np.array(point[v], dtype=np.float64)
        out[v] = {"mean": float(points[np.isfinite(points)].mean()), "interval": [lo, hi]}
    return out

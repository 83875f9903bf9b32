"""pipeline.study: figures over seeds and queries, paired differences and their intervals — exact
values on small inputs, and the intervals' coverage checked by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import study
from pipeline.study import Runs


def runs(*seeds, strata=None) -> Runs:
    places = np.array(seeds)
    return Runs(places, np.array(strata if strata is not None else [""] * places.shape[1]))


def test_the_figure_is_the_hit_rate_averaged_over_strata():
    assert study.metric(np.array([[0, 2, 1, 0]]), np.array([""] * 4), 1).tolist() == [0.5]
    assert study.metric(np.array([[0, 2, 1, 0]]), np.array([""] * 4), 2).tolist() == [0.75]
    # Probe categories weigh the same however many items each has: mean(1/3, 1) = 2/3.
    strata = np.array(["a", "a", "a", "b"])
    assert study.metric(np.array([[0, 1, 1, 0], [1, 1, 1, 0]]), strata, 1).tolist() == pytest.approx(
        [2 / 3, 0.5]
    )


def test_bootstrap_weights_resample_within_strata():
    strata = np.array(["a"] * 3 + ["b"] * 5)
    w = study.query_weights(strata, 50, np.random.default_rng(0))
    assert w.shape == (50, 8) and np.allclose(w.sum(1), 1)
    assert np.allclose(w[:, :3].sum(1), 0.5) and np.allclose(w[:, 3:].sum(1), 0.5)


def test_identical_runs_differ_by_exactly_nothing():
    a = runs([0, 1, 0, 3, 0, 0, 2, 0])
    out = study.compare({"base": a, "same": a}, k=1, references=["base"], replicates=200)
    d = out["same"]["differences"]["base"]
    assert d == {"mean": 0.0, "interval": [0.0, 0.0], "significant": False}
    assert out["base"]["mean"] == 5 / 8 and out["base"]["seeds"] == [5 / 8]
    lo, hi = out["base"]["interval"]
    assert lo < 5 / 8 < hi and "base" not in out["base"]["differences"]


def test_a_clear_gain_is_significant_and_noise_is_not():
    rng = np.random.default_rng(1)
    n = 600
    base = (rng.random(n) > 0.3).astype(int)  # hit rate 0.3 (place 0 is a hit)
    better = np.where(rng.random(n) < 0.5, 0, base)  # half the misses fixed
    noisy = base.copy()  # ten hits lost and ten misses won: as many changes as make no difference
    noisy[rng.choice(np.flatnonzero(base == 0), 10, replace=False)] = 1
    noisy[rng.choice(np.flatnonzero(base == 1), 10, replace=False)] = 0
    out = study.compare(
        {"base": runs(base), "better": runs(better, better), "noisy": runs(noisy)}, 1, ["base"], 1000
    )
    assert out["better"]["differences"]["base"]["significant"]
    assert out["better"]["differences"]["base"]["interval"][0] > 0.2
    d = out["noisy"]["differences"]["base"]
    assert d["mean"] == 0.0 and not d["significant"] and d["interval"][0] < 0 < d["interval"][1]


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(2)
    q = (rng.random(500) > 0.5).astype(int)
    flip = lambda p: np.where(rng.random(500) < p, 1 - q, q)  # noqa: E731
    steady = runs(q, q, q)
    shaky = runs(flip(0.0), flip(0.3), np.where(q == 1, 0, 0))  # seeds far apart
    out = study.compare({"steady": steady, "shaky": shaky}, 1, [], 1000)
    width = lambda v: v["interval"][1] - v["interval"][0]  # noqa: E731
    assert width(out["shaky"]) > 2 * width(out["steady"])
    assert len(out["shaky"]["seeds"]) == 3


def test_the_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(200):
        places = (rng.random(300) > 0.3).astype(int)  # true hit rate 0.3
        lo, hi = study.compare({"m": runs(places)}, 1, [], 500, seed=trial)["m"]["interval"]
        covered += lo <= 0.3 <= hi
    assert 0.89 <= covered / 200 <= 0.99


def test_runs_on_other_queries_are_refused():
    with pytest.raises(ValueError, match="b: its queries differ from a's"):
        study.compare({"a": runs([0, 1]), "b": runs([0, 1, 1])}, 1, [])
    with pytest.raises(ValueError, match="one stratum per query"):
        Runs(np.zeros((1, 3)), np.array(["", ""]))


def test_retention_is_the_mean_ratio_over_sets():
    sets = {
        "imagenet": {"base": runs([0, 0, 0, 1]), "v": runs([0, 0, 1, 1])},  # 0.5 / 0.75
        "cifar10": {"base": runs([0, 0]), "v": runs([0, 0])},  # 1.0
    }
    out = study.retention(sets, "base", replicates=300)
    assert out["v"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["base"]["mean"] == 1.0 and out["base"]["interval"] == [1.0, 1.0]
    lo, hi = out["v"]["interval"]
    assert lo < out["v"]["mean"] <= hi <= 1.0
    with pytest.raises(ValueError, match="no base run"):
        study.retention({"imagenet": {"v": runs([0])}}, "base")


def test_the_same_seed_gives_the_same_intervals():
    r = {"a": runs([0, 1, 2, 0, 0]), "b": runs([1, 1, 0, 0, 0], [0, 0, 0, 1, 0])}
    assert study.compare(r, 1, ["a"], 300, seed=4) == study.compare(r, 1, ["a"], 300, seed=4)

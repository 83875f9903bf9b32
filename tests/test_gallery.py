"""The retrieval gallery's groups, counts and seeded sample (pipeline/gallery.py)."""

from __future__ import annotations

import pytest

from pipeline.gallery import GROUPS, Outcome, build, outcomes, seeded_order


def test_each_caption_falls_in_one_group_and_the_counts_are_both_models_r_at_1():
    places = [(0, 0), (0, 3), (2, 0), (1, 1), (0, 0), (5, 0)]  # (base, student)
    base = [Outcome(b, ()) for b, _ in places]
    student = [Outcome(s, ()) for _, s in places]
    g = build("coco", base, student, sample_size=6, per_group=10)
    assert g.counts == {"student_fixed": 2, "student_broke": 1, "both_right": 2, "both_wrong": 1}
    assert g.counts["both_right"] + g.counts["student_fixed"] == sum(s == 0 for _, s in places)
    assert g.counts["both_right"] + g.counts["student_broke"] == sum(b == 0 for b, _ in places)
    assert sorted(g.sample) == list(range(6)) and g.sample_counts == g.counts
    assert {q for qs in g.shown.values() for q in qs} == set(range(6))
    assert g.shown["student_fixed"] == [q for q in g.sample if q in (2, 5)]


def test_the_sample_is_seeded_by_set_and_seed_and_caps_each_group():
    assert seeded_order("coco", 50, 0) == seeded_order("coco", 50, 0)
    assert seeded_order("coco", 50, 0) != seeded_order("coco", 50, 1)
    assert seeded_order("coco", 50, 0) != seeded_order("flickr30k", 50, 0)
    same = [Outcome(0, ())] * 50
    g = build("coco", same, same, sample_size=20, per_group=3)
    assert g.sample == seeded_order("coco", 50, 0)[:20]
    assert sum(g.sample_counts.values()) == 20 and g.sample_counts["both_right"] == 20
    assert g.shown == {**{k: [] for k in GROUPS}, "both_right": g.sample[:3]}


def test_outcomes_come_in_query_order_and_must_be_whole():
    rows = [
        {"dataset": "coco", "task": "text_to_image", "query": 1, "place": 4, "top": [3, 2]},
        {"dataset": "coco", "task": "text_to_image", "query": 0, "place": 0, "top": [1, 0]},
        {"dataset": "coco", "task": "image_to_text", "query": 0, "place": 9, "top": [7]},
    ]
    assert outcomes(rows, "coco") == [Outcome(0, (1, 0)), Outcome(4, (3, 2))]
    with pytest.raises(ValueError, match="does not hold every query once"):
        outcomes(rows[:1], "coco")
    with pytest.raises(ValueError, match="3 base queries but 2 student"):
        build("coco", [Outcome(0, ())] * 3, [Outcome(0, ())] * 2, 3, 1)

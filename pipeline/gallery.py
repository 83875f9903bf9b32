"""The retrieval gallery: which test captions the student now retrieves right that the base missed,
and the other way round, from the two models' per-query outcomes (evaluate's queries tables).

A caption is *right* for a model when its image is placed first (strict R@1: place 0). Every
caption falls in one of four groups, and the groups' sizes over all captions are the two models'
R@1 in counts: both_right + student_fixed = the student's R@1 × n, both_right + student_broke =
the base's. A seeded sample of captions (the same for any run of the same test set) gives the
examples shown, each with both models' top candidates (evaluate's `top` column).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GROUPS = ("student_fixed", "student_broke", "both_right", "both_wrong")
TITLES = {
    "student_fixed": "student fixed (base wrong, student right)",
    "student_broke": "student broke (base right, student wrong)",
    "both_right": "both right",
    "both_wrong": "both wrong",
}


@dataclass(frozen=True)
class Outcome:
    """One query of one model: the place of its positive (0: right) and its top candidates."""

    place: int
    top: tuple[int, ...]


@dataclass(frozen=True)
class Gallery:
    dataset: str
    queries: int  # captions in the test set
    counts: dict[str, int]  # per group, over every caption
    sample: list[int]  # the seeded sample of caption indices, in its order
    sample_counts: dict[str, int]  # per group, over the sample
    shown: dict[str, list[int]]  # per group: the first captions of the sample in it


def group_of(base: Outcome, student: Outcome) -> str:
    right = (base.place == 0, student.place == 0)
    return {
        (False, True): "student_fixed",
        (True, False): "student_broke",
        (True, True): "both_right",
        (False, False): "both_wrong",
    }[right]


def seeded_order(dataset: str, n: int, seed: int) -> list[int]:
    """0 … n-1 in an order fixed by (seed, data set): the same sample for any model or machine."""
    return sorted(range(n), key=lambda q: hashlib.sha256(f"{seed}:{dataset}:{q}".encode()).digest())


def build(
    dataset: str,
    base: Sequence[Outcome],
    student: Sequence[Outcome],
    sample_size: int,
    per_group: int,
    seed: int = 0,
) -> Gallery:
    """The four groups over every query, a seeded sample of `sample_size` queries and up to
    `per_group` of them to show per group. `base` and `student` list the same queries in order."""
    if len(base) != len(student):
        raise ValueError(f"{dataset}: {len(base)} base queries but {len(student)} student queries")
    groups = [group_of(b, s) for b, s in zip(base, student)]
    sample = seeded_order(dataset, len(groups), seed)[:sample_size]
    shown: dict[str, list[int]] = {g: [] for g in GROUPS}
    for q in sample:
        if len(shown[groups[q]]) < per_group:
            shown[groups[q]].append(q)
    return Gallery(
        dataset=dataset,
        queries=len(groups),
        counts={g: groups.count(g) for g in GROUPS},
        sample=sample,
        sample_counts={g: sum(groups[q] == g for q in sample) for g in GROUPS},
        shown=shown,
    )


def outcomes(rows: Sequence[Mapping], dataset: str, task: str = "text_to_image") -> list[Outcome]:
    """One model's outcomes of (dataset, task), in query order, from its queries table's rows."""
    mine = sorted(
        (r for r in rows if r["dataset"] == dataset and r["task"] == task), key=lambda r: r["query"]
    )
    if [r["query"] for r in mine] != list(range(len(mine))):
        raise ValueError(f"{dataset} {task}: the queries table does not hold every query once")
    return [Outcome(int(r["place"]), tuple(r["top"] or ())) for r in mine]

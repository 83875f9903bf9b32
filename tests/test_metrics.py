"""pipeline.metrics: exact values on hand-made cases, a brute-force reference on random ones."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import metrics
from pipeline.metrics import (
    captions_of_images,
    chance_recall_at_k,
    mean_average_precision,
    mean_reciprocal_rank,
    positive_ranks,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
    topk_recall,
    zero_shot_metrics,
)


def scored(scores: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, candidates) whose dot products are exactly `scores`: the rows against one-hots."""
    s = torch.tensor(scores, dtype=torch.float32)
    return s, torch.eye(s.shape[1])


# Seven captions × three images (A, B, C); A has five captions, B and C one each. Row = caption,
# column = image: its text→image scores, and transposed, the image→text scores.
SCORES = [
    [0.9, 0.1, 0.2],  # A: first
    [0.5, 0.6, 0.1],  # A: second
    [0.1, 0.3, 0.2],  # A: its image ranked last
    [0.4, 0.4, 0.4],  # A: a three-way tie, broken against the query: last
    [0.7, 0.2, 0.8],  # A: second
    [0.3, 0.5, 0.0],  # B: first
    [0.0, 0.9, 0.6],  # C: second
]
TEXT_IMAGE = torch.tensor([0, 0, 0, 0, 0, 1, 2])


def test_hand_made_retrieval_both_ways():
    txt, img = scored(SCORES)
    ranks = retrieval_ranks(img, txt, TEXT_IMAGE)
    assert ranks["text_to_image"][:, 0].tolist() == [0, 1, 2, 2, 1, 0, 1]
    # Image A's column, best first: c0 .9, c4 .7, c1 .5, c3 .4, (c5 .3, negative), c2 .1, (c6 0).
    assert ranks["image_to_text"].tolist() == [[0, 2, 5, 3, 1], [2, -1, -1, -1, -1], [1, -1, -1, -1, -1]]

    got = retrieval_metrics(img, txt, TEXT_IMAGE, ks=(1, 2, 5))
    t2i, i2t = got["text_to_image"], got["image_to_text"]
    assert t2i["R@1"] == pytest.approx(2 / 7)
    assert t2i["R@2"] == pytest.approx(5 / 7)
    assert t2i["R@5"] == 1.0
    mrr = (1 + 1 / 2 + 1 / 3 + 1 / 3 + 1 / 2 + 1 + 1 / 2) / 7
    assert t2i["MRR"] == pytest.approx(mrr)
    assert t2i["mAP"] == pytest.approx(mrr)  # one positive per query: mAP is MRR
    assert (i2t["R@1"], i2t["R@2"], i2t["R@5"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    # A's captions at places 1, 2, 3, 4, 6; B's at 3; C's at 2.
    ap_a = (1 / 1 + 2 / 2 + 3 / 3 + 4 / 4 + 5 / 6) / 5
    assert i2t["mAP"] == pytest.approx((ap_a + 1 / 3 + 1 / 2) / 3)
    assert i2t["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_map_differs_from_mrr_when_only_the_first_caption_is_found():
    # One image, five captions: one ranked first, the other four after all 5 negatives.
    scores = [[1.0, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9]]
    q, c = scored(scores)
    ranks = positive_ranks(q, c, torch.tensor([[0, 1, 2, 3, 4]]))
    assert ranks.tolist() == [[0, 6, 7, 8, 9]]
    assert mean_reciprocal_rank(ranks) == 1.0
    assert recall_at_k(ranks, (1,)) == {1: 1.0}
    assert mean_average_precision(ranks) == pytest.approx((1 + 2 / 7 + 3 / 8 + 4 / 9 + 5 / 10) / 5)


def test_ties_are_broken_against_the_query():
    # Negative 1 ties both positives: it goes first; the tied positives follow in listed order.
    q, c = scored([[0.5, 0.5, 0.5]])
    ranks = positive_ranks(q, c, torch.tensor([[2, 0]]))
    assert ranks.tolist() == [[1, 2]]
    assert mean_average_precision(ranks) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_a_collapsed_model_scores_nothing():
    img = torch.ones(4, 3)
    txt = torch.ones(8, 3)
    text_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    got = retrieval_metrics(img, txt, text_image, ks=(1, 2, 3, 4))
    assert [got["text_to_image"][f"R@{k}"] for k in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert got["text_to_image"]["R@4"] == 1.0
    # Each image's 2 captions come after the 6 others.
    assert got["image_to_text"]["R@4"] == 0.0
    assert got["image_to_text"]["MRR"] == pytest.approx(1 / 7)


def test_zero_shot_on_three_classes():
    classes = torch.eye(3)
    images = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # class 0: right
            [0.2, 0.7, 0.1],  # class 1: right
            [0.5, 0.4, 0.3],  # class 1: second
            [0.2, 0.1, 0.9],  # class 2: right
            [0.3, 0.3, 0.3],  # class 2: a tie, so last
        ]
    )
    labels = torch.tensor([0, 1, 1, 2, 2])
    got = zero_shot_metrics(images, classes, labels, ks=(1, 2, 5))
    assert got["top1"] == pytest.approx(3 / 5)
    assert got["top2"] == pytest.approx(4 / 5)
    assert got["top5"] == 1.0  # more than the 3 classes: every image
    assert got["mean_per_class_recall"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)


def test_chance_recall_is_the_hypergeometric_miss():
    assert chance_recall_at_k(5, torch.tensor([1]), (1, 2, 5, 9)) == pytest.approx(
        {1: 0.2, 2: 0.4, 5: 1.0, 9: 1.0}
    )
    assert chance_recall_at_k(5, torch.tensor([2]), (2,))[2] == pytest.approx(1 - 3 / 10)
    # Against every ordering of 6 candidates, 2 of them positive.
    n, positives = 6, {0, 1}
    for k in (1, 2, 3, 4):
        hits = [bool(positives & set(order[:k])) for order in itertools.permutations(range(n))]
        assert chance_recall_at_k(n, torch.tensor([2]), (k,))[k] == pytest.approx(sum(hits) / len(hits))


def test_captions_of_images_groups_and_pads():
    got = captions_of_images(torch.tensor([2, 0, 0, 1, 2, 2]), 3)
    assert got.tolist() == [[1, 2, -1], [3, -1, -1], [0, 4, 5]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: captions_of_images(torch.tensor([0, 0, 2]), 3), "image 1 has no caption"),
        (lambda: captions_of_images(torch.tensor([0, 3]), 3), r"image indices in \[0, 3\)"),
        (lambda: positive_ranks(torch.ones(2, 3), torch.ones(4, 2), torch.tensor([[0], [1]])), "same d"),
        (
            lambda: positive_ranks(torch.ones(1, 2), torch.ones(4, 2), torch.tensor([[4]])),
            "candidate indices",
        ),
        (
            lambda: positive_ranks(torch.ones(1, 2), torch.ones(4, 2), torch.tensor([[-1]])),
            "at least one positive",
        ),
        (
            lambda: positive_ranks(torch.ones(1, 2), torch.ones(4, 2), torch.tensor([[1, 1]])),
            "same positive twice",
        ),
        (lambda: positive_ranks(torch.ones(1, 2), torch.ones(4, 2), torch.tensor([[1.0]])), "int64"),
        (
            lambda: positive_ranks(torch.tensor([[math.nan, 0.0]]), torch.ones(4, 2), torch.tensor([[1]])),
            "NaN or infinity",
        ),
        (
            lambda: retrieval_ranks(torch.ones(2, 2), torch.ones(3, 2), torch.tensor([0, 1])),
            "3 caption embeddings",
        ),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- a brute-force reference on random inputs ---------------------------------------------------


def reference(
    scores: list[list[int]], positives: list[list[int]]
) -> list[tuple[list[int], Fraction, Fraction]]:
    """Per query: the places (from 0) of its positives in slot order, its reciprocal rank and
    average precision, from an explicitly sorted list (negatives before tied positives, tied
    positives in listed order); exact arithmetic."""
    out = []
    for row, pos in zip(scores, positives):
        slot = {c: j for j, c in enumerate(pos)}
        order = sorted(range(len(row)), key=lambda c: (-row[c], c in slot, slot.get(c, 0)))
        place = {c: i for i, c in enumerate(order)}
        found = sorted(place[c] for c in pos)
        ap = sum(Fraction(j + 1, p + 1) for j, p in enumerate(found)) / len(pos)
        out.append(([place[c] for c in pos], Fraction(1, found[0] + 1), ap))
    return out


@st.composite
def retrieval_problems(draw):
    """Small integer embeddings (exact dot products, so many exact ties) with 1–4 captions per image."""
    d = draw(st.integers(1, 3))
    n_images = draw(st.integers(1, 6))
    per_image = draw(st.lists(st.integers(1, 4), min_size=n_images, max_size=n_images))
    text_image = [i for i, n in enumerate(per_image) for _ in range(n)]
    draw(st.randoms()).shuffle(text_image)
    values = st.integers(-2, 2)
    img = draw(st.lists(st.lists(values, min_size=d, max_size=d), min_size=n_images, max_size=n_images))
    txt = draw(
        st.lists(st.lists(values, min_size=d, max_size=d), min_size=len(text_image), max_size=len(text_image))
    )
    chunk = draw(st.one_of(st.none(), st.integers(1, 8)))
    return (
        torch.tensor(img, dtype=torch.float32),
        torch.tensor(txt, dtype=torch.float32),
        torch.tensor(text_image),
        chunk,
    )


def check_against_reference(queries, candidates, positives, ranks):
    scores = (queries @ candidates.T).round().long().tolist()
    pos = [[c for c in row if c >= 0] for row in positives.tolist()]
    want = reference(scores, pos)
    for got_row, (places, _, _), n in zip(ranks.tolist(), want, (len(p) for p in pos)):
        assert got_row[:n] == places and all(r == -1 for r in got_row[n:])
    assert mean_reciprocal_rank(ranks) == pytest.approx(float(sum(w[1] for w in want) / len(want)))
    assert mean_average_precision(ranks) == pytest.approx(float(sum(w[2] for w in want) / len(want)))
    for k in (1, 2, 3, 5):
        hits = sum(min(places) < k for places, _, _ in want) / len(want)
        assert recall_at_k(ranks, (k,))[k] == pytest.approx(hits)


@settings(max_examples=200, deadline=None)
@given(retrieval_problems())
def test_chunked_ranks_agree_with_brute_force(problem):
    img, txt, text_image, chunk = problem
    ranks = retrieval_ranks(img, txt, text_image, chunk_size=chunk)
    check_against_reference(txt, img, text_image[:, None], ranks["text_to_image"])
    check_against_reference(img, txt, captions_of_images(text_image, len(img)), ranks["image_to_text"])


@settings(max_examples=100, deadline=None)
@given(retrieval_problems(), st.integers(1, 5))
def test_ranks_do_not_depend_on_the_chunking(problem, chunk):
    img, txt, text_image, _ = problem
    whole = retrieval_ranks(img, txt, text_image, chunk_size=10_000)
    assert all(torch.equal(whole[d], r) for d, r in retrieval_ranks(img, txt, text_image, chunk).items())


@settings(max_examples=100, deadline=None)
@given(retrieval_problems(), st.randoms())
def test_ranks_do_not_depend_on_the_order_of_candidates(problem, rnd):
    img, txt, text_image, _ = problem
    perm = list(range(len(img)))
    rnd.shuffle(perm)
    new_index = torch.empty(len(perm), dtype=torch.int64)
    new_index[torch.tensor(perm)] = torch.arange(len(perm))
    before = retrieval_ranks(img, txt, text_image)["text_to_image"]
    after = retrieval_ranks(img[torch.tensor(perm)], txt, new_index[text_image])["text_to_image"]
    assert torch.equal(before, after)


def test_automatic_chunks_bound_the_work_at_once(monkeypatch):
    torch.manual_seed(0)
    img, txt = torch.randn(40, 8), torch.randn(100, 8)
    text_image = torch.arange(100) % 40
    whole = retrieval_ranks(img, txt, text_image)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 300)  # a few queries per chunk
    seen = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: seen.append(a.shape[0]) or real_matmul(a, b))
    chunked = retrieval_ranks(img, txt, text_image)
    assert max(seen) < 40 and all(torch.equal(whole[d], chunked[d]) for d in whole)


def test_probe_accuracy_per_category_and_the_unweighted_mean():
    from pipeline.metrics import probe_accuracy

    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    negative = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])  # the last: a tie
    got = probe_accuracy(image, positive, negative, ["swap_att", "swap_att", "add_obj", "add_obj"])
    # swap_att: right, wrong → 0.5; add_obj: right, tie (a miss) → 0.5; mean over categories.
    assert got == {"add_obj": 0.5, "swap_att": 0.5, "mean": 0.5}
    got = probe_accuracy(image[:3], positive[:3], negative[:3], ["a", "a", "b"])
    assert got == {"a": 0.5, "b": 1.0, "mean": 0.75}  # not 2/3: categories weigh the same
    with pytest.raises(ValueError, match="counts differ"):
        probe_accuracy(image, positive, negative, ["a"])


def test_probe_places_and_the_text_side_ceiling():
    from pipeline.metrics import probe_places, probe_text_cosine

    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    negative = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])  # the last: a tie, a miss
    assert probe_places(image, positive, negative).tolist() == [0, 1, 1]
    got = probe_text_cosine(positive, negative, ["a", "a", "b"])
    # a: cos 0 and 0; b: the same caption twice, cos 1 — no image can tell those apart.
    assert got == {"a": 0.0, "b": pytest.approx(1.0), "mean": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="counts differ"):
        probe_text_cosine(positive, negative, ["a"])


def test_an_empty_evaluation_set_is_a_clear_error_not_a_torch_one():
    # Before: retrieval raised torch's "max(): Expected reduction dim ..." RuntimeError and
    # zero-shot returned NaN accuracies.
    none = torch.zeros(0, 4)
    no_index = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="^no images: an empty evaluation set has no metrics$"):
        metrics.retrieval_metrics(none, none, no_index)
    with pytest.raises(
        ValueError, match="^0 queries and 3 candidates: an empty evaluation set has no metrics$"
    ):
        metrics.zero_shot_metrics(none, torch.randn(3, 4), no_index)
    with pytest.raises(ValueError, match="^2 queries and 0 candidates: an empty evaluation set"):
        metrics.zero_shot_metrics(torch.randn(2, 4), none, torch.zeros(2, dtype=torch.int64))


# --- CLIP_benchmark's R@k: the top k by torch.topk ------------------------------------------------------


def test_topk_recall_on_hand_made_scores():
    # The hand-made set: caption 3's three-way tie is a hit for torch.topk (its image is listed
    # first), a miss for the project's R@k; every other caption as its ranks say.
    txt, img = scored(SCORES)
    assert recall_at_k(retrieval_ranks(img, txt, TEXT_IMAGE)["text_to_image"], (1, 2)) == {1: 2 / 7, 2: 5 / 7}
    assert topk_recall(txt, img, TEXT_IMAGE[:, None], (1, 2, 5)) == {1: 3 / 7, 2: 6 / 7, 5: 1.0}
    # A tie at the top: torch.topk's k = 1 keeps the first listed, so a positive listed first
    # counts, where the project's R@1 counts the tie against the model.
    q, c = scored([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    positives = torch.tensor([[0], [1]])
    assert topk_recall(q, c, positives, (1,)) == {1: 0.5}
    assert recall_at_k(positive_ranks(q, c, positives), (1,)) == {1: 0.0}
    # k beyond the candidates takes them all.
    assert topk_recall(q, c, positives, (10,)) == {10: 1.0}


def test_top_candidates_are_the_best_scores_best_first_in_any_chunking():
    q, c = scored([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.6, 0.8]])
    assert metrics.top_candidates(q, c, 3).tolist() == [[1, 2, 3], [3, 0, 2]]
    assert metrics.top_candidates(q, c, 3, chunk_size=1).tolist() == [[1, 2, 3], [3, 0, 2]]
    assert metrics.top_candidates(q, c, 10).shape == (2, 4)  # k beyond the candidates: all of them
    with pytest.raises(ValueError, match="k must be positive"):
        metrics.top_candidates(q, c, 0)


@settings(max_examples=200, deadline=None)
@given(retrieval_problems())
def test_topk_recall_is_clip_benchmark_s_own(problem):
    """CLIP_benchmark's recall code (a dev dependency) on the same scores, both ways: the small
    integer embeddings tie often, so its tie handling is exercised."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as cb_recall_at_k

    img, txt, text_image, chunk = problem
    scores = txt @ img.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), text_image] = True
    for k in (1, 2, 3, 5):
        if k <= img.shape[0]:
            cb = (batchify(cb_recall_at_k, scores, positive_pairs, 4, "cpu", k=k) > 0).float().mean().item()
            ours = topk_recall(txt, img, text_image[:, None], (k,), chunk)[k]
            assert ours == pytest.approx(cb)
        if k <= txt.shape[0]:
            cb = (
                (batchify(cb_recall_at_k, scores.T, positive_pairs.T, 4, "cpu", k=k) > 0)
                .float()
                .mean()
                .item()
            )
            ours = topk_recall(img, txt, captions_of_images(text_image, len(img)), (k,), chunk)[k]
            assert ours == pytest.approx(cb)

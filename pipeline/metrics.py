"""Retrieval and zero-shot metrics: pure functions on embeddings.

Definitions follow LAION's CLIP_benchmark. A query's score for a candidate is the dot product of
their embeddings (pass L2-normalised embeddings for cosine similarity). A query is a hit at k if
any of its positives is among the k best-scoring candidates. For retrieval with several captions
per image, text→image has one positive per caption (its image) and image→text has every caption
of the image; recall is averaged over queries (captions, resp. images).

- R@k: fraction of queries with a positive in the top k.
- MRR: mean of 1 / (place of the best-placed positive), places counted from 1.
- mAP: mean over queries of the average precision over *all* positives, so for image→text every
  one of the image's captions counts; for one positive per query mAP equals MRR. (The DCLIP
  authors' "MAP" is MRR; both are reported here.)
- Zero-shot top-k: the image's class among the k best-scoring class embeddings.

Ties are broken against the query: a negative that scores the same as a positive is placed above
it, and tied positives are placed in the order they are listed. So equal scores never flatter a
model; a collapsed model whose scores are all equal places every positive after every negative.

`topk_recall` is CLIP_benchmark's R@k as its code computes it, the figure published numbers use: a
query is a hit at k if a positive is among the k candidates `torch.topk` returns. Among exactly
tied scores that keeps whichever torch returns (for k = 1 the first listed; beyond, an order of
torch's kernel), so where scores tie (a caption repeated word for word across images) it can
count a hit that `recall_at_k` does not.

Scores are computed a chunk of queries at a time and never held whole: memory is bounded by the
chunk (a fixed number of score elements), whatever the number of queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Elements of the (queries × positives × candidates) comparison held at once: ~16M (64 MB of
# scores and 16 MB of booleans), whatever the data set size.
CHUNK_ELEMENTS = 1 << 24
_PAD = torch.iinfo(torch.int64).max  # stands in for a padding slot's rank where it must lose


def positive_ranks(
    queries: Tensor, candidates: Tensor, positives: Tensor, chunk_size: int | None = None
) -> Tensor:
    """The place of each positive in its query's ranking of all candidates, 0 for the top.

    queries: (Q, d); candidates: (N, d); positives: (Q, P) candidate indices, rows with fewer
    than P positives padded with -1. Returns (Q, P) int64, -1 where `positives` is padding; the
    positives of one query get distinct places (ties broken as the module says).
    chunk_size: queries per chunk; None picks it from CHUNK_ELEMENTS."""
    _check(queries, candidates, positives)
    n_queries, n_pos = positives.shape
    n_cand = candidates.shape[0]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, n_pos * n_cand))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # [j, j']: slot j' is listed before slot j, so it goes first on a tie.
    earlier = torch.ones(n_pos, n_pos, dtype=torch.bool).tril(-1)
    out = torch.empty(n_queries, n_pos, dtype=torch.int64)
    for start in range(0, n_queries, chunk_size):
        stop = min(start + chunk_size, n_queries)
        scores = queries[start:stop] @ candidates.T  # (c, N)
        pos = positives[start:stop]
        valid = pos >= 0
        pos_scores = scores.gather(1, pos.clamp(min=0))  # (c, P)
        rows, slots = valid.nonzero(as_tuple=True)
        is_pos = torch.zeros_like(scores, dtype=torch.bool)
        is_pos[rows, pos[rows, slots]] = True
        negatives = scores.masked_fill_(is_pos, -math.inf)
        # Negatives at or above each positive, then the query's other positives placed above it.
        ahead = (negatives[:, None, :] >= pos_scores[:, :, None]).sum(-1, dtype=torch.int32)
        other, this = pos_scores[:, None, :], pos_scores[:, :, None]
        before = ((other > this) | ((other == this) & earlier)) & valid[:, None, :]
        ranks = (ahead + before.sum(-1, dtype=torch.int32)).long()
        out[start:stop] = ranks.masked_fill_(~valid, -1)
    return out


def _check(queries: Tensor, candidates: Tensor, positives: Tensor) -> None:
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"queries and candidates must be (n, d) with the same d, got {tuple(queries.shape)} "
            f"and {tuple(candidates.shape)}"
        )
    if positives.ndim != 2 or positives.shape[0] != queries.shape[0] or positives.dtype != torch.int64:
        raise ValueError(
            f"positives must be int64 (queries, P), got {positives.dtype} {tuple(positives.shape)}"
        )
    if queries.shape[0] == 0 or candidates.shape[0] == 0:
        raise ValueError(
            f"{queries.shape[0]} queries and {candidates.shape[0]} candidates: an empty evaluation set "
            "has no metrics"
        )
    if not (torch.isfinite(queries).all() and torch.isfinite(candidates).all()):
        raise ValueError("embeddings contain NaN or infinity")
    if positives.numel() and (positives.max() >= candidates.shape[0] or positives.min() < -1):
        raise ValueError(f"positives must be candidate indices in [0, {candidates.shape[0]}) or -1 padding")
    if positives.shape[1] == 0 or not (positives >= 0).any(dim=1).all():
        raise ValueError("every query needs at least one positive")
    # A candidate listed twice as one query's positive would be counted twice.
    srt = positives.sort(dim=1).values
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        raise ValueError("a query lists the same positive twice")


def best_ranks(ranks: Tensor) -> Tensor:
    """Place of each query's best-placed positive."""
    return ranks.masked_fill(ranks < 0, _PAD).min(dim=1).values


def recall_at_k(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries with a positive in the top k, for each k."""
    best = best_ranks(ranks)
    return {k: float((best < k).double().mean()) for k in ks}


def mean_reciprocal_rank(ranks: Tensor) -> float:
    return float((1.0 / (best_ranks(ranks).double() + 1)).mean())


def mean_average_precision(ranks: Tensor) -> float:
    """Mean over queries of the average precision over all of the query's positives: the j-th
    best-placed positive at place r (from 1) contributes precision j / r."""
    valid = ranks >= 0
    srt = ranks.masked_fill(~valid, _PAD).sort(dim=1).values  # padding last
    j = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)
    precision = torch.where(srt != _PAD, j / (srt.double() + 1), 0.0)
    return float((precision.sum(1) / valid.sum(1)).mean())


def chance_recall_at_k(n_candidates: int, n_positives: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Expected R@k of a uniformly random ranking: a query with p positives among n candidates
    misses the top k with probability C(n - p, k) / C(n, k)."""
    p = n_positives.double()
    out = {}
    for k in ks:
        i = torch.arange(min(k, n_candidates), dtype=torch.float64)
        miss = ((n_candidates - p[:, None] - i) / (n_candidates - i)).clamp(min=0).prod(dim=1)
        out[k] = float((1 - miss).mean())
    return out


def captions_of_images(text_image: Tensor, n_images: int) -> Tensor:
    """(n_images, P) caption indices per image, padded with -1, from each caption's image index."""
    if n_images == 0:
        raise ValueError("no images: an empty evaluation set has no metrics")
    bad = text_image.numel() and (text_image.min() < 0 or text_image.max() >= n_images)
    if text_image.ndim != 1 or bad:
        raise ValueError(f"text_image must hold image indices in [0, {n_images})")
    counts = torch.bincount(text_image, minlength=n_images)
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption")
    order = torch.argsort(text_image, stable=True)
    slot = torch.arange(len(text_image)) - (torch.cumsum(counts, 0) - counts)[text_image[order]]
    out = torch.full((n_images, int(counts.max())), -1, dtype=torch.int64)
    out[text_image[order], slot] = order
    return out


def retrieval_ranks(
    image_emb: Tensor, text_emb: Tensor, text_image: Tensor, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Positive ranks both ways: "text_to_image" (n_texts, 1) and "image_to_text" (n_images, P).
    text_image: the index of each caption's image."""
    if text_emb.shape[0] != text_image.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} caption embeddings but {text_image.shape[0]} image indices")
    i2t = captions_of_images(text_image, image_emb.shape[0])
    return {
        "text_to_image": positive_ranks(text_emb, image_emb, text_image[:, None], chunk_size),
        "image_to_text": positive_ranks(image_emb, text_emb, i2t, chunk_size),
    }


def topk_recall(
    queries: Tensor, candidates: Tensor, positives: Tensor, ks: Sequence[int], chunk_size: int | None = None
) -> dict[int, float]:
    """CLIP_benchmark's R@k: the fraction of queries with a positive among `torch.topk`'s k best
    candidates, each k by its own topk call as CLIP_benchmark makes it. Arguments as for
    `positive_ranks`. A k beyond the number of candidates takes them all (torch.topk would refuse)."""
    _check(queries, candidates, positives)
    n_queries, n_cand = queries.shape[0], candidates.shape[0]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // n_cand)
    hits = {k: 0 for k in ks}
    for start in range(0, n_queries, chunk_size):
        stop = min(start + chunk_size, n_queries)
        scores = queries[start:stop] @ candidates.T
        is_pos = torch.zeros_like(scores, dtype=torch.bool)
        pos = positives[start:stop]
        rows, slots = (pos >= 0).nonzero(as_tuple=True)
        is_pos[rows, pos[rows, slots]] = True
        for k in ks:
            top = torch.topk(scores, min(k, n_cand), dim=1).indices
            hits[k] += int(is_pos.gather(1, top).any(dim=1).sum())
    return {k: hits[k] / n_queries for k in ks}


def summarise(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k for each k, mAP and MRR of one direction."""
    out = {f"R@{k}": v for k, v in recall_at_k(ranks, ks).items()}
    out["mAP"] = mean_average_precision(ranks)
    out["MRR"] = mean_reciprocal_rank(ranks)
    return out


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """R@k, mAP and MRR for text→image and image→text."""
    ranks = retrieval_ranks(image_emb, text_emb, text_image, chunk_size)
    return {direction: summarise(r, ks) for direction, r in ranks.items()}


def top_candidates(queries: Tensor, candidates: Tensor, k: int, chunk_size: int | None = None) -> Tensor:
    """(Q, min(k, N)) int64: each query's k best-scoring candidates, best first, as torch.topk
    orders them (for showing what a model retrieved: exact ties may come in either order)."""
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)} do not match"
        )
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n_cand = candidates.shape[0]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, n_cand))
    parts = [
        torch.topk(queries[start : start + chunk_size] @ candidates.T, min(k, n_cand), dim=1).indices
        for start in range(0, queries.shape[0], chunk_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0, min(k, n_cand), dtype=torch.int64)


def zero_shot_ranks(
    image_emb: Tensor, class_emb: Tensor, labels: Tensor, chunk_size: int | None = None
) -> Tensor:
    """Place of each image's true class among all classes, (n_images, 1)."""
    return positive_ranks(image_emb, class_emb, labels.to(torch.int64)[:, None], chunk_size)


def zero_shot_metrics(
    image_emb: Tensor,
    class_emb: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Top-k accuracy for each k, and mean per-class recall (top-1 accuracy averaged over the
    classes present, as CLIP_benchmark reports for unbalanced sets)."""
    ranks = zero_shot_ranks(image_emb, class_emb, labels, chunk_size)
    out = {f"top{k}": v for k, v in recall_at_k(ranks, ks).items()}
    labels = labels.to(torch.int64)
    hits = torch.bincount(labels, weights=(ranks[:, 0] == 0).double(), minlength=class_emb.shape[0])
    counts = torch.bincount(labels, minlength=class_emb.shape[0])
    present = counts > 0
    out["mean_per_class_recall"] = float((hits[present] / counts[present]).mean())
    return out


def probe_accuracy(
    image_emb: Tensor, positive_emb: Tensor, negative_emb: Tensor, categories: Sequence[str]
) -> dict[str, float]:
    """SugarCrepe's accuracy: the fraction of items whose image scores higher with the true
    caption than with the hard negative (a tie counts as a miss), per category, and "mean": the
    mean over categories (each category weighs the same, as SugarCrepe reports)."""
    if not (len(image_emb) == len(positive_emb) == len(negative_emb) == len(categories)):
        raise ValueError("image, caption, negative and category counts differ")
    right = probe_places(image_emb, positive_emb, negative_emb) == 0
    out: dict[str, float] = {}
    for c in sorted(set(categories)):
        mask = torch.tensor([x == c for x in categories])
        out[c] = float(right[mask].float().mean())
    out["mean"] = sum(out.values()) / len(out) if out else math.nan
    return out


def probe_places(image_emb: Tensor, positive_emb: Tensor, negative_emb: Tensor) -> Tensor:
    """Each probe item's true caption's place against its negative: 0 when it scores higher, 1
    otherwise (a tie counts against it), so that accuracy is R@1 over the items."""
    right = (image_emb * positive_emb).sum(-1) > (image_emb * negative_emb).sum(-1)
    return (~right).to(torch.int64)


def probe_text_cosine(
    positive_emb: Tensor, negative_emb: Tensor, categories: Sequence[str]
) -> dict[str, float]:
    """Mean cosine of each item's true caption and its negative (embeddings L2-normalised), per
    category and "mean" over categories: how far apart the text side holds the two."""
    if not (len(positive_emb) == len(negative_emb) == len(categories)):
        raise ValueError("caption, negative and category counts differ")
    cos = (positive_emb * negative_emb).sum(-1)
    out: dict[str, float] = {}
    for c in sorted(set(categories)):
        mask = torch.tensor([x == c for x in categories])
        out[c] = float(cos[mask].mean())
    out["mean"] = sum(out.values()) / len(out) if out else math.nan
    return out

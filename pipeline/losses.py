"""The losses of the method: symmetric InfoNCE, cosine distillation, and the distillation total.

Pure functions of embeddings; every input is L2-normalised here, so callers may pass raw features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` and row i of `b` are the positive pair, every other row of
    the batch a negative; the mean of the a→b and b→a cross-entropies."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def cosine_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of 1 − cos(a_i, b_i); with a bool `mask`, over the rows it marks
    (0, still in the graph, when it marks none)."""
    distance = 1 - F.cosine_similarity(a, b, dim=-1)
    if mask is None:
        return distance.mean()
    return (distance * mask).sum() / mask.sum().clamp_min(1)


@dataclass(frozen=True)
class DistillWeights:
    cos: float = 1.0  # λ_cos: pull toward the teacher's image embedding; 0 is the no-teacher ablation
    anchor: float = 0.0  # λ_anchor: stay near the base CLIP image embedding (the paper's ViT-L setting)


def distill_loss(
    student: torch.Tensor,
    text: torch.Tensor,
    teacher: torch.Tensor,
    base: torch.Tensor | None,
    logit_scale: torch.Tensor | float,
    weights: DistillWeights,
    teacher_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """InfoNCE(student image, frozen caption) + λ_cos·(1 − cos(student, teacher))
    [+ λ_anchor·(1 − cos(student, base))]. Returns every term and their weighted total; a term
    whose weight is 0 is left out of the graph entirely, not multiplied by zero. `teacher_mask`
    marks the pairs that have a teacher target (None: all); the teacher term averages over them."""
    terms = {"contrastive": info_nce(student, text, logit_scale)}
    total = terms["contrastive"]
    if weights.cos:
        terms["teacher_cos"] = cosine_distance(student, teacher, teacher_mask)
        total = total + weights.cos * terms["teacher_cos"]
    if weights.anchor:
        if base is None:
            raise ValueError("an anchor weight needs the base CLIP image embeddings")
        terms["anchor_cos"] = cosine_distance(student, base)
        total = total + weights.anchor * terms["anchor_cos"]
    terms["total"] = total
    return terms

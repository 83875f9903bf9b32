"""The cross-modal meta-teacher: caption tokens and YOLO regions attend to each other.

Inputs per (image, caption) pair, all cached by `embed` in CLIP's joint space:
regions [R, D] (the whole image is region 0), region weights [R], caption tokens [T, D].
Two cross-attention layers — text→regions and regions→text — each with a residual and LayerNorm
and a key padding mask, so padding never receives attention. Each stream is pooled by
temperature-scaled attention pooling, softmax(cos(x_i, mean x) / T), and the two global vectors
are averaged into the teacher's image embedding (L2-normalised).

Region weights (confidence × area × similarity, from `embed`) enter as log-weights added to the
attention logits wherever regions are attended or pooled: attention to region r becomes
proportional to w_r · exp(q·k_r). Uniform weights add a constant and change nothing, so the
weights act as a prior over regions rather than a rescaling of their values, and a region with
weight 0 is ignored exactly like padding.

`inputs: regions` is a teacher that reads no caption at all (beyond the paper): the regions attend
to each other (one self-attention layer, the same masks and log-weight priors; the weights then
come without their caption factor) and are pooled the same way. Its embedding carries only what
the image's regions hold, so it cannot pull the student toward the pair's own caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Attention = Literal["bidirectional", "text_to_regions", "regions_to_text", "none"]
Regions = Literal["yolo", "whole_image"]
Inputs = Literal["regions_and_caption", "regions"]
NEG = -1e4  # a masked logit: exp() underflows to 0 in float32 and float16 alike


@dataclass(frozen=True)
class TeacherConfig:
    dim: int  # CLIP's joint space: 512 for ViT-B, 768 for ViT-L, 128 for the demo model
    heads: int = 8
    dropout: float = 0.0
    attention: Attention = "bidirectional"
    regions: Regions = "yolo"
    region_weights: bool = True
    pool_temperature: float = 0.1
    aggregation_clusters: int = 1  # 3: average of three cluster poolings (the paper's ViT-L)
    # regions_and_caption: the paper's teacher; regions: no caption (regions attend to regions;
    # `attention` is then bidirectional for that self-attention or none for a weighted mean)
    inputs: Inputs = "regions_and_caption"

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.aggregation_clusters < 1:
            raise ValueError(f"aggregation_clusters must be >= 1, got {self.aggregation_clusters}")
        if self.inputs == "regions" and self.attention not in ("bidirectional", "none"):
            raise ValueError(
                f"attention {self.attention!r} needs caption tokens; a teacher on regions alone takes "
                "bidirectional (regions attend to each other) or none"
            )


@dataclass
class PairBatch:
    """A padded batch of pairs; masks are True where an entry is real."""

    regions: torch.Tensor  # [B, R, D]
    region_mask: torch.Tensor  # [B, R] bool
    weights: torch.Tensor  # [B, R], each row summing to 1 over its real regions
    tokens: torch.Tensor  # [B, T, D]
    token_mask: torch.Tensor  # [B, T] bool
    caption: torch.Tensor  # [B, D]: the frozen pooled CLIP caption embedding

    def to(self, device) -> PairBatch:
        return PairBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pad(arrays: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length [n_i, ...] tensors → zero-padded [B, max n, ...] and the bool mask of real
    entries."""
    longest = max(len(a) for a in arrays)
    out = arrays[0].new_zeros((len(arrays), longest, *arrays[0].shape[1:]))
    mask = torch.zeros((len(arrays), longest), dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
        mask[i, : len(a)] = True
    return out, mask


class CrossAttention(nn.Module):
    """queries ← LayerNorm(queries + MultiheadAttention(queries, keys, keys)), with a key padding
    mask and an optional additive bias on the keys (the region log-weights)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor, kv_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        bias = torch.zeros(kv_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~kv_mask, NEG)
        if kv_bias is not None:
            bias = bias + kv_bias
        # A float mask [B·heads, Tq, Tk] carries both the padding and the weights.
        mask = bias[:, None, :].expand(-1, q.shape[1], -1).repeat_interleave(self.heads, dim=0)
        out, _ = self.attn(q, kv, kv, attn_mask=mask, need_weights=False)
        return self.norm(q + out)


def attention_pool(
    x: torch.Tensor, mask: torch.Tensor, temperature: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_i softmax_i(cos(x_i, mean x) / T + bias_i) · x_i over the real entries of each row."""
    m = mask.to(x.dtype)[..., None]
    centre = (x * m).sum(1) / m.sum(1).clamp_min(1)
    logits = F.cosine_similarity(x, centre[:, None, :], dim=-1) / temperature
    if bias is not None:
        logits = logits + bias
    attn = logits.masked_fill(~mask, float("-inf")).softmax(dim=1)
    return (attn[..., None] * x).sum(1)


def clustered_pool(
    x: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    k: int,
    bias: torch.Tensor | None = None,
    iters: int = 5,
) -> torch.Tensor:
    """The mean of attention poolings over k clusters of each row's real entries (spherical
    k-means, seeded with evenly spaced real entries); k = 1 is plain attention pooling."""
    if k == 1:
        return attention_pool(x, mask, temperature, bias)
    xn = F.normalize(x, dim=-1).detach()
    n_real = mask.sum(1)
    # Seeds: real entries at evenly spaced positions (real entries come first in every row).
    seeds = (torch.arange(k, device=x.device)[None, :] * n_real[:, None]) // k
    centroids = xn.gather(1, seeds[..., None].expand(-1, -1, x.shape[-1]))
    for _ in range(iters):
        assign = (xn @ centroids.transpose(1, 2)).argmax(-1)  # [B, N]
        onehot = F.one_hot(assign, k).to(x.dtype) * mask[..., None]
        centroids = F.normalize(onehot.transpose(1, 2) @ xn + 1e-12, dim=-1)
    pooled: torch.Tensor | int = 0
    used: torch.Tensor | int = 0
    for c in range(k):
        member = mask & (assign == c)
        present = member.any(1)
        p = attention_pool(x, member | ~present[:, None] & mask, temperature, bias)
        pooled = pooled + p * present[:, None]
        used = used + present.to(x.dtype)[:, None]
    assert isinstance(pooled, torch.Tensor)  # k > 1: the loop ran
    return pooled / used


class Teacher(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        # Per-stream input maps, identity at the start: every variant, `none` included, has
        # something to train, and training starts from CLIP's own geometry.
        attn, captioned = cfg.attention, cfg.inputs == "regions_and_caption"
        self.region_in = nn.Linear(cfg.dim, cfg.dim)
        self.token_in = nn.Linear(cfg.dim, cfg.dim) if captioned else None
        for lin in (self.region_in, self.token_in):
            if lin is not None:
                nn.init.eye_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.text_to_regions = (
            CrossAttention(cfg.dim, cfg.heads, cfg.dropout)
            if captioned and attn in ("bidirectional", "text_to_regions")
            else None
        )
        self.regions_to_text = (
            CrossAttention(cfg.dim, cfg.heads, cfg.dropout)
            if captioned and attn in ("bidirectional", "regions_to_text")
            else None
        )
        self.regions_to_regions = (
            CrossAttention(cfg.dim, cfg.heads, cfg.dropout) if not captioned and attn != "none" else None
        )

    def forward(self, b: PairBatch) -> torch.Tensor:
        """The teacher image embedding [B, D], L2-normalised."""
        cfg = self.cfg
        regions, rmask, weights = b.regions, b.region_mask, b.weights
        if cfg.regions == "whole_image":  # the no-YOLO ablation: region 0 alone
            regions, rmask, weights = regions[:, :1], rmask[:, :1], torch.ones_like(weights[:, :1])
        if not cfg.region_weights:
            weights = rmask.to(regions.dtype)
        # log w, with the weights renormalised over the real regions; a zero weight masks. All
        # zero (which embed never writes) falls back to uniform rather than to nothing.
        w = weights * rmask
        w = torch.where(w.sum(1, keepdim=True) > 0, w, rmask.to(w.dtype))
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        log_w = torch.log(w.clamp_min(1e-12)).masked_fill(w <= 0, NEG)
        r = self.region_in(regions)
        k, temp = cfg.aggregation_clusters, cfg.pool_temperature
        if cfg.inputs == "regions":  # no caption: the tokens are not read
            if self.regions_to_regions is None:
                return F.normalize((w[..., None] * r).sum(1), dim=-1)
            r2 = self.regions_to_regions(r, r, rmask, log_w)
            return F.normalize(clustered_pool(r2, rmask & (w > 0), temp, k, bias=log_w), dim=-1)
        assert self.token_in is not None  # inputs "regions_and_caption" build it
        t = self.token_in(b.tokens)
        if cfg.attention == "none":
            g_r = (w[..., None] * r).sum(1)
            g_t = (t * b.token_mask[..., None]).sum(1) / b.token_mask.sum(1, keepdim=True).clamp_min(1)
            return F.normalize(g_r + g_t, dim=-1)
        # Both layers read the input streams: the two directions are parallel, not stacked.
        t2 = self.text_to_regions(t, r, rmask, log_w) if self.text_to_regions is not None else t
        r2 = self.regions_to_text(r, t, b.token_mask) if self.regions_to_text is not None else r
        g_t = clustered_pool(t2, b.token_mask, temp, k)
        g_r = clustered_pool(r2, rmask & (w > 0), temp, k, bias=log_w)
        return F.normalize(F.normalize(g_t, dim=-1) + F.normalize(g_r, dim=-1), dim=-1)


class TeacherWithScale(nn.Module):
    """The teacher and the InfoNCE temperature (as CLIP's log logit scale), saved together."""

    def __init__(self, cfg: TeacherConfig, temperature: float, learnable: bool):
        super().__init__()
        self.teacher = Teacher(cfg)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / temperature))), requires_grad=learnable)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=float(np.log(100))).exp()  # CLIP's cap on the scale

    def forward(self, b: PairBatch) -> torch.Tensor:
        return self.teacher(b)

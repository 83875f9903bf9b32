"""pipeline.models.teacher and pipeline.losses: exact values on small inputs, padding invariance,
and that every ablation variant is a different computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import DistillWeights, cosine_distance, distill_loss, info_nce
from pipeline.models.teacher import PairBatch, Teacher, TeacherConfig, attention_pool, clustered_pool, pad


def batch(b=4, d=32, regions=(3, 1, 5, 2), tokens=(4, 7, 2, 5), seed=0) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    r, rm = pad([torch.randn(n, d, generator=g) for n in regions[:b]])
    t, tm = pad([torch.randn(n, d, generator=g) for n in tokens[:b]])
    w = torch.rand(rm.shape, generator=g) * rm
    return PairBatch(r, rm, w / w.sum(1, keepdim=True), t, tm, torch.randn(b, d, generator=g))


def teacher(seed=0, **kw) -> Teacher:
    torch.manual_seed(seed)
    return Teacher(TeacherConfig(**{"dim": 32, "heads": 4, **kw})).eval()


# --- losses -------------------------------------------------------------------------------------


def test_info_nce_hand_computed():
    eye = torch.eye(2)
    # logits = I: each row's cross-entropy is log(1 + e^-1), in both directions.
    assert info_nce(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # normalised: [.707, .707], [0, 1]
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(2 * s) / (math.exp(2 * s) + math.exp(0)))
    row1 = -math.log(math.exp(2) / (math.exp(2 * s) + math.exp(2)))
    col0 = -math.log(math.exp(2 * s) / (math.exp(2 * s) + math.exp(2 * s)))
    col1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(2)))
    assert info_nce(a, b, 2.0).item() == pytest.approx(((row0 + row1) / 2 + (col0 + col1) / 2) / 2, abs=1e-6)


def test_cosine_distance_and_the_distillation_total():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # cos 0 and 1 → distances 1 and 0
    base = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])  # cos -1 and 1 → distances 2 and 0
    assert cosine_distance(s, t).item() == pytest.approx(0.5)
    text = torch.eye(2)
    terms = distill_loss(s, text, t, base, 1.0, DistillWeights(cos=0.5, anchor=2.0))
    assert terms["teacher_cos"].item() == pytest.approx(0.5) and terms["anchor_cos"].item() == pytest.approx(
        1.0
    )
    want = info_nce(s, text, 1.0).item() + 0.5 * 0.5 + 2.0 * 1.0
    assert terms["total"].item() == pytest.approx(want, abs=1e-6)


def test_a_zero_teacher_weight_removes_the_teacher_term_from_the_graph():
    s = torch.randn(3, 4, requires_grad=True)
    teacher_emb = torch.randn(3, 4, requires_grad=True)
    terms = distill_loss(s, torch.randn(3, 4), teacher_emb, None, 1.0, DistillWeights(cos=0.0))
    assert set(terms) == {"contrastive", "total"}
    terms["total"].backward()
    assert teacher_emb.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="anchor"):
        distill_loss(s, s, s, None, 1.0, DistillWeights(anchor=1.0))


# --- pooling ------------------------------------------------------------------------------------


def test_attention_pool_hand_computed():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    # mean of the real entries is (.5, .5): both at cos 1/√2, so equal weights → (.5, .5).
    assert attention_pool(x, mask, 0.1)[0].tolist() == pytest.approx([0.5, 0.5])
    # A bias of log 3 on the first entry weights it 3:1.
    bias = torch.tensor([[math.log(3), 0.0, 0.0]])
    assert attention_pool(x, mask, 0.1, bias)[0].tolist() == pytest.approx([0.75, 0.25])
    # Three entries, one off-centre: weights softmax(cos/T).
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    centre = torch.tensor([2 / 3, 1 / 3])
    c = F.cosine_similarity(y[0], centre[None], dim=-1) / 0.5
    want = (c.softmax(0)[:, None] * y[0]).sum(0)
    assert attention_pool(y, torch.ones(1, 3, dtype=torch.bool), 0.5)[0].tolist() == pytest.approx(
        want.tolist()
    )


def test_clustered_pool_with_one_cluster_is_attention_pool_and_three_differ():
    b = batch()
    one = clustered_pool(b.tokens, b.token_mask, 0.1, 1)
    assert torch.equal(one, attention_pool(b.tokens, b.token_mask, 0.1))
    three = clustered_pool(b.tokens, b.token_mask, 0.1, 3)
    assert three.shape == one.shape and torch.isfinite(three).all()
    assert not torch.allclose(one[1], three[1], atol=1e-4)  # 7 tokens: three real clusters
    # Two well separated groups and k = 2: the mean of each group's pooling.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    got = clustered_pool(x, torch.ones(1, 4, dtype=torch.bool), 0.1, 2)
    assert got[0].tolist() == pytest.approx([0.5, 0.5])


# --- the teacher --------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["bidirectional", "text_to_regions", "regions_to_text", "none"])
@pytest.mark.parametrize("clusters", [1, 3])
def test_padding_does_not_change_the_output(attention, clusters):
    model = teacher(attention=attention, aggregation_clusters=clusters)
    b = batch()
    extra = PairBatch(
        F.pad(b.regions, (0, 0, 0, 3), value=7.0),
        F.pad(b.region_mask, (0, 3)),
        F.pad(b.weights, (0, 3), value=0.5),
        F.pad(b.tokens, (0, 0, 0, 4), value=-3.0),
        F.pad(b.token_mask, (0, 4)),
        b.caption,
    )
    with torch.no_grad():
        assert torch.allclose(model(b), model(extra), atol=1e-5)


@pytest.mark.parametrize(("dim", "heads"), [(512, 8), (768, 12)])
def test_shapes_for_vit_b_and_vit_l(dim, heads):
    model = teacher(dim=dim, heads=heads)
    out = model(batch(d=dim))
    assert out.shape == (4, dim)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_each_ablation_is_a_different_computation():
    b = batch()
    outs = {}
    for attention in ("bidirectional", "text_to_regions", "regions_to_text", "none"):
        for regions in ("yolo", "whole_image"):
            for weights in (True, False):
                with torch.no_grad():
                    outs[attention, regions, weights] = teacher(
                        attention=attention, regions=regions, region_weights=weights
                    )(b)
    # Row 0 has three regions and four tokens; every setting gives a different embedding, except
    # that with the whole image alone the region weights have nothing to weigh.
    distinct = {k: v[0] for k, v in outs.items() if not (k[1] == "whole_image" and not k[2])}
    keys = list(distinct)
    for i, a in enumerate(keys):
        for c in keys[i + 1 :]:
            assert not torch.allclose(distinct[a], distinct[c], atol=1e-4), (a, c)
    for attention in ("bidirectional", "none"):
        assert torch.equal(outs[attention, "whole_image", True], outs[attention, "whole_image", False])


def test_none_is_the_plain_mean_of_regions_and_tokens():
    b = batch()
    with torch.no_grad():
        got = teacher(attention="none", region_weights=False)(b)
    rm, tm = b.region_mask[..., None], b.token_mask[..., None]
    mean = (b.regions * rm).sum(1) / rm.sum(1) + (b.tokens * tm).sum(1) / tm.sum(1)
    assert torch.allclose(got, F.normalize(mean, dim=-1), atol=1e-6)
    with torch.no_grad():
        weighted = teacher(attention="none")(b)
    wmean = (b.weights[..., None] * b.regions).sum(1) + (b.tokens * tm).sum(1) / tm.sum(1)
    assert torch.allclose(weighted, F.normalize(wmean, dim=-1), atol=1e-6)


def test_region_weights_act_as_a_prior_a_zero_weight_drops_the_region():
    model = teacher()
    b = batch(b=1, regions=(3,), tokens=(4,))
    dropped = PairBatch(
        b.regions[:, :2], b.region_mask[:, :2], b.weights[:, :2], b.tokens, b.token_mask, b.caption
    )
    zeroed = PairBatch(
        b.regions,
        b.region_mask,
        torch.cat([b.weights[:, :2], torch.zeros(1, 1)], 1),
        b.tokens,
        b.token_mask,
        b.caption,
    )
    with torch.no_grad():
        assert torch.allclose(model(zeroed), model(dropped), atol=1e-5)
        uniform = PairBatch(
            b.regions, b.region_mask, torch.full((1, 3), 1 / 3), b.tokens, b.token_mask, b.caption
        )
        unweighted = teacher(region_weights=False)
        assert torch.allclose(model(uniform), unweighted(b), atol=1e-5)
        # All-zero weights fall back to uniform.
        zeros = PairBatch(b.regions, b.region_mask, torch.zeros(1, 3), b.tokens, b.token_mask, b.caption)
        assert torch.allclose(model(zeros), model(uniform), atol=1e-5)


def test_a_short_training_run_lowers_the_contrastive_loss():
    torch.manual_seed(0)
    model = Teacher(TeacherConfig(dim=32, heads=4))
    data = [batch(seed=s) for s in range(4)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> float:
        with torch.no_grad():
            return sum(info_nce(model(b), b.caption, 10.0).item() for b in data)

    before = loss()
    for _ in range(30):
        for b in data:
            opt.zero_grad()
            info_nce(model(b), b.caption, 10.0).backward()
            opt.step()
    assert loss() < 0.8 * before


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        TeacherConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="aggregation_clusters"):
        TeacherConfig(dim=32, aggregation_clusters=0)
    with pytest.raises(ValueError, match="needs caption tokens"):
        TeacherConfig(dim=32, inputs="regions", attention="text_to_regions")


def test_a_teacher_on_regions_alone_never_reads_the_caption():
    b = batch()
    other = PairBatch(
        b.regions, b.region_mask, b.weights, torch.randn_like(b.tokens), b.token_mask, b.caption
    )
    for attention in ("bidirectional", "none"):
        model = teacher(inputs="regions", attention=attention)
        assert model.token_in is None and model.text_to_regions is None and model.regions_to_text is None
        with torch.no_grad():
            assert torch.equal(model(b), model(other))
    # none: the weighted mean of the regions through the (identity-initialised) input map.
    with torch.no_grad():
        got = teacher(inputs="regions", attention="none")(b)
    assert torch.allclose(got, F.normalize((b.weights[..., None] * b.regions).sum(1), dim=-1), atol=1e-6)
    # bidirectional: regions attend to each other, a different computation from the captioned teacher's.
    with torch.no_grad():
        assert not torch.allclose(teacher(inputs="regions")(b), teacher()(b), atol=1e-3)


def test_a_masked_cosine_distance_averages_the_marked_rows_only():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert cosine_distance(a, b).item() == pytest.approx((0 + 1 + 2) / 3)
    assert cosine_distance(a, b, torch.tensor([True, True, False])).item() == pytest.approx(0.5)
    none = cosine_distance(a.requires_grad_(), b, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and none.requires_grad  # still in the graph: a batch may lack targets

"""pipeline.models.student: the text tower is frozen (by hash), exactly the chosen blocks train,
and an exported student loads in open_clip itself."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from pipeline.losses import info_nce
from pipeline.models.clip import create, save_checkpoint
from pipeline.models.student import (
    checkpoint_activations,
    freeze_for_distillation,
    frozen_hash,
    set_train_mode,
    trainable_names,
)

MODEL = "DCLIP-Demo-RN64"  # the demo's CLIP: a ModifiedResNet image tower, 4 stages of 1 bottleneck
TINY_VIT = "Test-Tiny-ViT"  # a ViT image tower of 4 transformer blocks, as the paper's models have


@pytest.fixture(scope="module", autouse=True)
def tiny_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / f"{TINY_VIT}.json"
    vision = {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16}
    text = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    path.write_text(json.dumps({"embed_dim": 128, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(path)


def build(name):
    torch.manual_seed(0)
    model, _, tokenizer = create(name, "none")
    return model, tokenizer


@pytest.fixture()
def clip():
    return build(MODEL)


def step(model, tokenizer, params):
    """Two real optimisation steps of the student objective on random images. Two: the ResNet's
    residual branches start at zero (bn3.weight = 0), so the biases inside them get their first
    gradient in the second step."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    set_train_mode(model)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a red circle", "a blue star", "two squares", "a ring"]))
    for _ in range(2):
        opt.zero_grad()
        loss = info_nce(model.encode_image(images), text, model.logit_scale.exp())
        loss.backward()
        opt.step()


def test_training_the_student_leaves_the_text_tower_bit_identical(clip):
    model, tokenizer = clip
    before = frozen_hash(model)
    visual = {n: p.detach().clone() for n, p in model.visual.named_parameters()}
    step(model, tokenizer, freeze_for_distillation(model, None))
    assert frozen_hash(model) == before
    assert not model.transformer.training and model.visual.training
    changed = [n for n, p in model.visual.named_parameters() if not torch.equal(p, visual[n])]
    assert len(changed) == len(visual)
    # The hash does see a change to the text side, the logit scale included.
    with torch.no_grad():
        model.logit_scale += 1e-3
    assert frozen_hash(model) != before


# architecture, block i's parameter prefix, first block index, the head's parameter prefixes
TOWERS = {
    "vit": (TINY_VIT, "visual.transformer.resblocks.{}.", 0, ("visual.ln_post.", "visual.proj")),
    "resnet": (MODEL, "visual.layer{}.0.", 1, ("visual.attnpool.",)),
}


@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_only_the_chosen_blocks_and_the_head_change(tower, blocks):
    name, block, first, head = TOWERS[tower]
    model, tokenizer = build(name)
    chosen = tuple(block.format(first + i) for i in range(4 - blocks, 4))
    want = [n for n, _ in model.named_parameters() if n.startswith(chosen + head)]
    assert trainable_names(model, blocks) == want
    assert any(n.startswith(head) for n in want) and len(want) < len(list(model.visual.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, tokenizer, freeze_for_distillation(model, blocks))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(want)


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_all_blocks_is_the_whole_image_tower_and_bad_counts_are_named(tower):
    model, _ = build(TOWERS[tower][0])
    assert trainable_names(model, None) == [f"visual.{n}" for n, _ in model.visual.named_parameters()]
    assert set(trainable_names(model, 4)) < set(trainable_names(model, None))  # the stem stays
    with pytest.raises(ValueError, match=r"distill.trainable_blocks: 5 is not within 0..4"):
        trainable_names(model, 5)


def test_a_tower_without_blocks_is_refused_by_name(clip):
    model, _ = clip
    model.visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 128))
    with pytest.raises(ValueError, match=r"trainable_blocks: the image tower Sequential has neither"):
        trainable_names(model, 1)
    assert trainable_names(model, None) == ["visual.1.weight", "visual.1.bias"]


def test_an_exported_student_loads_in_open_clip_with_the_same_embeddings(clip, tmp_path):
    model, tokenizer = clip
    step(model, tokenizer, freeze_for_distillation(model, 2))
    model.eval()
    path = tmp_path / "student.pt"
    save_checkpoint(model, path)
    loaded, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    loaded.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model.encode_image(images, normalize=True)
        b = loaded.encode_image(images, normalize=True)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_gradient_checkpointing_trains_the_same_weights_bit_for_bit():
    """runtime.grad_checkpointing recomputes the ViT blocks' activations in the backward pass:
    the same arithmetic, so two steps give exactly the same image tower; on a ResNet tower it is
    reported off and changes nothing."""
    trained = []
    for enable in (False, True):
        model, tokenizer = build(TINY_VIT)
        assert checkpoint_activations(model, enable) is enable
        assert model.visual.transformer.grad_checkpointing is enable
        step(model, tokenizer, freeze_for_distillation(model, None))
        trained.append({n: p.detach().clone() for n, p in model.visual.named_parameters()})
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])
    resnet, _ = build(MODEL)
    assert checkpoint_activations(resnet, True) is False

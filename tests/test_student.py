"""pipeline.models.student: the text tower is frozen (by hash), exactly the chosen blocks train,
and an exported student loads in open_clip itself."""

from __future__ import annotations

import open_clip
import pytest
import torch

from pipeline.losses import info_nce
from pipeline.models.clip import create, save_checkpoint
from pipeline.models.student import freeze_for_distillation, frozen_hash, set_train_mode, trainable_names

MODEL = "DCLIP-Demo-S16"


@pytest.fixture()
def clip():
    torch.manual_seed(0)
    model, preprocess, tokenizer = create(MODEL, "none")
    return model, tokenizer


def step(model, tokenizer, params):
    """One real optimisation step of the student objective on random images."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    set_train_mode(model)
    images = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a red circle", "a blue star", "two squares", "a ring"]))
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


@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_only_the_chosen_blocks_and_the_head_change(clip, blocks):
    model, tokenizer = clip
    names = trainable_names(model, blocks)
    assert {n for n in names if ".resblocks." in n} == {
        n
        for n, _ in model.named_parameters()
        for i in range(4 - blocks, 4)
        if n.startswith(f"visual.transformer.resblocks.{i}.")
    }
    assert {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"} <= set(names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, tokenizer, freeze_for_distillation(model, blocks))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)


def test_all_blocks_is_the_whole_image_tower_and_bad_counts_are_named(clip):
    model, _ = clip
    assert trainable_names(model, None) == [f"visual.{n}" for n, _ in model.visual.named_parameters()]
    assert set(trainable_names(model, 4)) < set(trainable_names(model, None))  # patch embedding stays
    with pytest.raises(ValueError, match=r"distill.trainable_blocks: 5 is not within 0..4"):
        trainable_names(model, 5)


def test_an_exported_student_loads_in_open_clip_with_the_same_embeddings(clip, tmp_path):
    model, tokenizer = clip
    step(model, tokenizer, freeze_for_distillation(model, 2))
    model.eval()
    path = tmp_path / "student.pt"
    save_checkpoint(model, path)
    loaded, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    loaded.eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a = model.encode_image(images, normalize=True)
        b = loaded.encode_image(images, normalize=True)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999

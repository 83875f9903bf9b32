"""pipeline.train: the schedule, accumulation, checkpoints and exact resume on CPU."""

from __future__ import annotations

import pytest
import torch

from pipeline.train import Optimisation, Trainer, contrastive_batches, lr_factor
from tests.helpers import optimisation


def test_lr_factor_warms_up_then_decays_per_step_to_zero():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == pytest.approx(1.0)
    assert lr_factor(7, 10, 4) == pytest.approx(0.5)
    assert lr_factor(10, 10, 4) == pytest.approx(0.0)
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)
    return x, y


def make(tmp, epochs=3, accumulate=1, batch=16, dropout=0.2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1))
    x, y = problem()
    cfg = optimisation(
        epochs=epochs, lr=1e-2, weight_decay=0.01, warmup_steps=2, grad_clip=1.0, accumulate=accumulate
    )
    trainer = Trainer(
        model, model.parameters(), cfg, steps_per_epoch=len(x) // batch, checkpoints=tmp, progress=False
    )

    def data(epoch):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        return [(x[order[i : i + batch]], y[order[i : i + batch]]) for i in range(0, len(x), batch)]

    def loss(b):
        return {"total": torch.nn.functional.mse_loss(model(b[0]), b[1])}

    return model, trainer, data, loss


def test_training_lowers_the_loss_and_checkpoints_every_epoch(tmp_path):
    model, trainer, data, loss = make(tmp_path, dropout=0.0)
    x, y = problem()
    before = torch.nn.functional.mse_loss(model(x), y).item()
    history = trainer.fit(data, loss, on_epoch=lambda e: {"val": float(e)})
    assert torch.nn.functional.mse_loss(model(x), y).item() < before
    assert [h["epoch"] for h in history] == [1, 2, 3] and [h["val"] for h in history] == [1.0, 2.0, 3.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]
    assert trainer.sched.last_epoch == trainer.total == 12
    # Every step is recorded with the rate it used: warm-up 0.5, 1.0, then cosine down.
    assert [s["step"] for s in trainer.steps] == list(range(1, 13))
    assert [round(s["lr"] / 1e-2, 4) for s in trainer.steps[:3]] == [0.5, 1.0, 1.0]
    assert trainer.steps[-1]["lr"] < trainer.steps[5]["lr"]


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    full, trainer, data, loss = make(tmp_path / "full")
    trainer.fit(data, loss)

    def kill_at_3(epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return {}

    model, trainer, data, loss = make(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(data, loss, on_epoch=kill_at_3)
    assert not (tmp_path / "killed" / "epoch-3.pt").exists()
    resumed, trainer, data, loss = make(tmp_path / "killed")  # a new process: fresh model
    history = trainer.fit(data, loss)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_checkpoint_from_other_settings_is_refused(tmp_path):
    _, trainer, data, loss = make(tmp_path, epochs=1)
    trainer.fit(data, loss)
    _, other, data, loss = make(tmp_path, epochs=1, accumulate=2)
    with pytest.raises(ValueError, match="other settings"):
        other.fit(data, loss)


def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path):
    a, ta, da, la = make(tmp_path / "a", epochs=1, batch=16, dropout=0.0)
    b, tb, db, lb = make(tmp_path / "b", epochs=1, batch=8, accumulate=2, dropout=0.0)
    ta.fit(da, la)
    tb.fit(db, lb)
    assert ta.total == tb.total == 4
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        optimisation(epochs=0, lr=1e-3)
    with pytest.raises(ValueError):
        optimisation(epochs=1, lr=1e-3, amp="fp8")


def test_contrastive_batches_drop_only_a_lone_last_pair():
    assert [contrastive_batches(n, 4) for n in (0, 1, 4, 5, 6, 11, 12)] == [0, 0, 1, 1, 2, 3, 3]


def test_optimisation_is_built_from_a_section_and_a_missing_key_fails_loudly():
    from pipeline.config import Params, settings

    section = Params().distill.model_copy(update={"epochs": 3, "lr": 0.1, "grad_clip": 2.0, "seed": 4})
    assert settings(Optimisation, section, optimizer="adam") == optimisation(
        epochs=3,
        lr=0.1,
        grad_clip=2.0,
        seed=4,
        optimizer="adam",
        weight_decay=section.weight_decay,
        warmup_steps=section.warmup_steps,
        accumulate=section.accumulate,
        amp=section.amp,
    )
    # The teacher section has no accumulate key: leaving it out is an error, not a default.
    with pytest.raises(TypeError, match=r"no params key Teacher.accumulate"):
        settings(Optimisation, Params().teacher, optimizer="adam", amp="auto")
    with pytest.raises(TypeError, match=r"has no field\(s\) \['momentum'\]"):
        settings(Optimisation, Params().distill, optimizer="adam", momentum=0.9)


def test_weight_decay_spares_1d_parameters_and_embeddings():
    from pipeline.models.clip import create
    from pipeline.models.student import freeze_for_distillation
    from pipeline.train import decay_groups

    model, _, _ = create("DCLIP-Demo-RN64", "none")
    freeze_for_distillation(model, None)
    decay, plain = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "visual.attnpool.positional_embedding" in plain_names  # 2-D, but an embedding
    assert {"visual.bn1.weight", "visual.bn1.bias", "visual.attnpool.c_proj.bias"} <= plain_names
    assert {"visual.conv1.weight", "visual.attnpool.c_proj.weight"} <= decay_names
    assert all(n.startswith("visual.") for n in plain_names | decay_names)  # the frozen side is out
    assert all(p.ndim >= 2 for p in decay["params"])

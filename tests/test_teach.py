"""pipeline.teach: reading embed's teacher-ready shards, the validation slice, seeded epochs,
training with resume, and the targets — on synthetic caches in the exact shard format."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import teach
from pipeline.models.teacher import TeacherConfig
from pipeline.shards import ShardWriter
from pipeline.train import Optimisation

D = 16


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_cache(folder, n=60, per_shard=25, seed=0):
    """Pairs whose caption is the mean of the tokens, and the tokens echo the first region: a
    teacher that reads both streams can learn the match."""
    rng = np.random.default_rng(seed)
    keys = []
    with ShardWriter(folder, max_count=per_shard) as w:
        for i in range(n):
            r, t = 1 + i % 4, 2 + i % 5
            regions = rng.normal(size=(r, D)).astype(np.float16)
            tokens = (regions[0] + 0.5 * rng.normal(size=(t, D))).astype(np.float16)
            weights = rng.random(r).astype(np.float32)
            fields = {
                "regions.npy": npy(regions),
                "weights.npy": npy(weights / weights.sum()),
                "tokens.npy": npy(tokens),
                "caption.npy": npy(tokens.mean(0).astype(np.float16)),
                "image.npy": npy(regions[0]),
                "json": {"image": f"img-{i}"},
            }
            key = f"pair-{i:03d}"
            w.write(key, fields)
            keys.append(key)
    return sorted(folder.glob("*.tar")), keys


@pytest.fixture()
def cache(tmp_path):
    return write_cache(tmp_path / "teacher")


def data(shards, batch=8, val=0.2, seed=0):
    return teach.Data(tuple(shards), batch, val, seed)


def test_pairs_read_back_with_their_shapes(cache):
    shards, keys = cache
    pairs = [p for s in shards for p in teach.read_pairs(s)]
    assert [p.key for p in pairs] == keys
    p = pairs[5]  # i = 5: two regions, two tokens
    assert p.regions.shape == (2, D) and p.weights.shape == (2,) and p.tokens.shape == (2, D)
    assert p.caption.shape == (D,) and p.image.shape == (D,)


def test_a_sample_missing_a_member_is_named(tmp_path):
    with ShardWriter(tmp_path, max_count=5) as w:
        w.write("k1", {"regions.npy": npy(np.zeros((1, D), np.float16))})
    with pytest.raises(ValueError, match=r"sample k1: missing weights\.npy, tokens\.npy, caption\.npy"):
        list(teach.read_pairs(next(tmp_path.glob("*.tar"))))


def test_the_validation_slice_is_fixed_by_key_and_seed():
    keys = [f"k{i}" for i in range(4000)]
    chosen = [k for k in keys if teach.is_validation(k, 0.1, 0)]
    assert 330 < len(chosen) < 470
    assert chosen == [k for k in keys if teach.is_validation(k, 0.1, 0)]
    assert chosen != [k for k in keys if teach.is_validation(k, 0.1, 1)]


def test_an_epoch_visits_every_training_pair_once_in_a_seeded_order(cache):
    shards, keys = cache
    d = data(shards, batch=7)
    val = {p.key for p in teach.validation_pairs(d)}
    assert val and teach.count_training_pairs(d) == len(keys) - len(val)

    def captions(epoch):
        return [tuple(c.tolist()) for b in teach.train_batches(d, epoch) for c in b.caption]

    one = captions(1)
    assert len(one) == len(set(one)) and len(one) >= len(keys) - len(val) - 1  # a last single pair drops
    assert one == captions(1) and one != captions(2)
    batches = list(teach.train_batches(d, 1))
    assert all(b.regions.shape[0] == b.caption.shape[0] <= 7 for b in batches)
    assert all(torch.allclose(b.caption.norm(dim=-1), torch.ones(len(b.caption))) for b in batches)


def settings(epochs=4):
    return TeacherConfig(dim=D, heads=2), Optimisation(epochs=epochs, lr=3e-3, optimizer="adam", seed=0)


def test_training_validates_every_epoch_and_lowers_the_validation_loss(cache, tmp_path):
    shards, _ = cache
    cfg, opt = settings(epochs=6)
    model, history, reference = teach.train_teacher(
        cfg, opt, data(shards), 0.07, True, tmp_path / "ckpt", torch.device("cpu"), progress=False
    )
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert {"train_total", "val_loss", "val_t2i_R@1", "val_i2t_R@1", "logit_scale"} <= set(history[0])
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert reference["pairs"] > 0 and "base_t2i_R@1" in reference
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"epoch-{e}.pt" for e in range(1, 7)]


def test_a_killed_training_resumes_to_the_same_teacher(cache, tmp_path):
    shards, _ = cache
    cfg, opt = settings(epochs=3)
    full, _, _ = teach.train_teacher(
        cfg, opt, data(shards), 0.07, True, tmp_path / "a", torch.device("cpu"), progress=False
    )

    def kill(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        teach.train_teacher(
            cfg, opt, data(shards), 0.07, True, tmp_path / "b", torch.device("cpu"), kill, progress=False
        )
    resumed, history, _ = teach.train_teacher(
        cfg, opt, data(shards), 0.07, True, tmp_path / "b", torch.device("cpu"), progress=False
    )
    assert len(history) == 3
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_targets_cover_every_pair_keyed_and_normalised(cache, tmp_path):
    shards, keys = cache
    cfg, opt = settings(epochs=2)
    d = data(shards)
    model, _, _ = teach.train_teacher(
        cfg, opt, d, 0.07, False, tmp_path / "ckpt", torch.device("cpu"), progress=False
    )
    teach.load_epoch(model, tmp_path / "ckpt", 1, "cpu")
    out = tmp_path / "targets.parquet"
    assert teach.write_targets(model, d, out, "cpu", D) == len(keys)
    table = pq.read_table(out)
    assert table.column("key").to_pylist() == keys
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert emb.shape == (len(keys), D) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    # The targets are the teacher's output for each pair.
    pairs = [p for s in shards for p in teach.read_pairs(s)]
    with torch.no_grad():
        direct = model(teach.collate(pairs[:3])).numpy()
    assert np.allclose(emb[:3], direct, atol=2e-3)
    with pytest.raises(ValueError, match=r"teacher.use_epoch: no checkpoint for epoch 9"):
        teach.load_epoch(model, tmp_path / "ckpt", 9, "cpu")
    # A frozen temperature stays at its value.
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_the_memory_cache_reads_each_shard_once_and_changes_nothing(cache, tmp_path, monkeypatch):
    shards, keys = cache
    cfg, opt = settings(epochs=2)
    reads = []
    real = teach.read_pairs
    monkeypatch.setattr(teach, "read_pairs", lambda s: reads.append(s) or real(s))
    results = {}
    for name, budget in (("memory", 1 << 30), ("stream", 0)):
        reads.clear()
        d = teach.Data(tuple(shards), 8, 0.2, 0, memory_cache_bytes=budget)
        model, history, _ = teach.train_teacher(
            cfg, opt, d, 0.07, False, tmp_path / name, torch.device("cpu"), progress=False
        )
        teach.write_targets(model, d, tmp_path / f"{name}.parquet", "cpu", D)
        results[name] = (history, (tmp_path / f"{name}.parquet").read_bytes(), len(reads))
    # In memory: each shard read once; streamed: once per epoch, validation and targets.
    assert results["memory"][2] == len(shards) < results["stream"][2]
    assert results["memory"][0] == results["stream"][0]
    assert results["memory"][1] == results["stream"][1]

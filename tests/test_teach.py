"""pipeline.teach: reading embed's teacher-ready shards, the validation slice, seeded epochs,
training with resume, and the targets — on synthetic caches in the exact shard format."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import teach, teacher_pairs, teacher_validation
from pipeline.models.teacher import TeacherConfig
from pipeline.shards import ShardWriter
from tests.helpers import optimisation

D = 16


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_cache(folder, n=60, per_shard=25, seed=0, per_image=3):
    """Pairs of `per_image` captions per image (the regions are the image's, the same in each of
    its pairs); a caption is the mean of its tokens, and the tokens echo the first region: a
    teacher that reads both streams can learn the match."""
    rng = np.random.default_rng(seed)
    keys, regions_of = [], {}
    with ShardWriter(folder, max_count=per_shard) as w:
        for i in range(n):
            image = i // per_image
            r, t = 1 + image % 4, 2 + i % 5
            if image not in regions_of:
                regions_of[image] = rng.normal(size=(r, D)).astype(np.float16)
            regions = regions_of[image]
            tokens = (regions[0] + 0.5 * rng.normal(size=(t, D))).astype(np.float16)
            weights = rng.random(r).astype(np.float32)
            prior = np.arange(1, r + 1, dtype=np.float32)
            fields = {
                "regions.npy": npy(regions),
                "weights.npy": npy(weights / weights.sum()),
                "prior.npy": npy(prior / prior.sum()),
                "tokens.npy": npy(tokens),
                "caption.npy": npy(tokens.mean(0).astype(np.float16)),
                "image.npy": npy(regions[0]),
                "json": {"image": f"img-{image:03d}"},
            }
            key = f"pair-{i:03d}"
            w.write(key, fields)
            keys.append(key)
    return sorted(folder.glob("*.tar")), keys


@pytest.fixture()
def cache(tmp_path):
    return write_cache(tmp_path / "teacher")


def data(shards, batch=8, val=0.2, seed=0, prior=False):
    return teacher_pairs.Data(tuple(shards), batch, val, seed, prior=prior)


def test_pairs_read_back_with_their_shapes(cache):
    shards, keys = cache
    pairs = [p for s in shards for p in teacher_pairs.read_pairs(s)]
    assert [p.key for p in pairs] == keys
    p = pairs[5]  # i = 5: image 1, two regions; two tokens
    assert p.regions.shape == (2, D) and p.weights.shape == (2,) and p.tokens.shape == (2, D)
    assert (
        p.caption.shape == (D,)
        and p.image.shape == (D,)
        and p.prior.tolist() == pytest.approx([1 / 3, 2 / 3])
    )
    assert [q.image_id for q in pairs[3:7]] == ["img-001"] * 3 + ["img-002"]


def test_a_sample_missing_a_member_is_named(tmp_path):
    with ShardWriter(tmp_path, max_count=5) as w:
        w.write("k1", {"regions.npy": npy(np.zeros((1, D), np.float16))})
    with pytest.raises(
        ValueError,
        match=r"sample k1: missing weights\.npy, prior\.npy, tokens\.npy, caption\.npy, image\.npy, json",
    ):
        list(teacher_pairs.read_pairs(next(tmp_path.glob("*.tar"))))


def test_the_validation_slice_holds_whole_images(cache):
    shards, _ = cache
    val = teacher_pairs.validation_pairs(data(shards))
    images = {p.image_id for p in val}
    assert images and len(val) == 3 * len(images)  # every caption of a held-out image


def test_the_validation_slice_is_fixed_by_key_and_seed():
    keys = [f"k{i}" for i in range(4000)]
    chosen = [k for k in keys if teacher_pairs.is_validation(k, 0.1, 0)]
    assert 330 < len(chosen) < 470
    assert chosen == [k for k in keys if teacher_pairs.is_validation(k, 0.1, 0)]
    assert chosen != [k for k in keys if teacher_pairs.is_validation(k, 0.1, 1)]


def test_an_epoch_visits_every_training_pair_once_in_a_seeded_order(cache):
    shards, keys = cache
    d = data(shards, batch=7)
    val = {p.key for p in teacher_pairs.validation_pairs(d)}
    assert val and teacher_pairs.count_training_pairs(d) == len(keys) - len(val)

    def batches(epoch):
        return [teacher_pairs.collate(pairs, d.prior) for pairs in teacher_pairs.epoch_pairs(d, epoch)]

    def captions(epoch):
        return [tuple(c.tolist()) for b in batches(epoch) for c in b.caption]

    one = captions(1)
    assert len(one) == len(set(one)) and len(one) >= len(keys) - len(val) - 1  # a last single pair drops
    assert one == captions(1) and one != captions(2)
    first = batches(1)
    assert all(b.regions.shape[0] == b.caption.shape[0] <= 7 for b in first)
    assert all(torch.allclose(b.caption.norm(dim=-1), torch.ones(len(b.caption))) for b in first)


def settings(epochs=4):
    return TeacherConfig(dim=D, heads=2), optimisation(epochs=epochs, lr=3e-3, optimizer="adam")


def train(cfg, opt, d, temperature, learnable, checkpoints, device, *args, target="paper", **kw):
    """teach.train_teacher with the temperature and target given plainly."""
    step = teach.Settings(temperature=temperature, learnable_temperature=learnable, target=target)
    return teach.train_teacher(cfg, step, opt, d, checkpoints, device, *args, **kw)


def test_training_validates_every_epoch_and_lowers_the_validation_loss(cache, tmp_path):
    shards, _ = cache
    cfg, opt = settings(epochs=6)
    model, history, reference = train(
        cfg, opt, data(shards), 0.07, True, tmp_path / "ckpt", torch.device("cpu"), progress=False
    )
    assert [h["epoch"] for h in history] == list(range(1, 7))
    leak_free = {"val_unseen_t2i_R@1", "val_unseen_i2t_R@1", "val_base_t2i_R@1", "val_cos_own_caption"}
    assert {"train_total", "val_loss", "logit_scale"} | leak_free <= set(history[0])
    # The leaky figure (a target scored against the caption it was conditioned on) is gone.
    assert "val_t2i_R@1" not in history[0]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert reference["pairs"] == 3 * reference["images"] > 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"epoch-{e}.pt" for e in range(1, 7)]


def test_a_killed_training_resumes_to_the_same_teacher(cache, tmp_path):
    shards, _ = cache
    cfg, opt = settings(epochs=3)
    full, _, _ = train(
        cfg, opt, data(shards), 0.07, True, tmp_path / "a", torch.device("cpu"), progress=False
    )

    def kill(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, opt, data(shards), 0.07, True, tmp_path / "b", torch.device("cpu"), kill, progress=False)
    resumed, history, _ = train(
        cfg, opt, data(shards), 0.07, True, tmp_path / "b", torch.device("cpu"), progress=False
    )
    assert len(history) == 3
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_targets_cover_every_pair_keyed_and_normalised(cache, tmp_path):
    shards, keys = cache
    cfg, opt = settings(epochs=2)
    d = data(shards)
    model, _, _ = train(cfg, opt, d, 0.07, False, tmp_path / "ckpt", torch.device("cpu"), progress=False)
    teach.load_epoch(model, tmp_path / "ckpt", 1, "cpu")
    out = tmp_path / "targets.parquet"
    assert teach.write_targets(model, d, out, "cpu", D) == (len(keys), 0)
    table = pq.read_table(out)
    assert table.schema.metadata == {b"target": b"paper", b"pairs_without_target": b"0"}
    assert table.column("key").to_pylist() == keys
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert emb.shape == (len(keys), D) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    # The targets are the teacher's output for each pair.
    pairs = [p for s in shards for p in teacher_pairs.read_pairs(s)]
    with torch.no_grad():
        direct = model(teacher_pairs.collate(pairs[:3])).numpy()
    assert np.allclose(emb[:3], direct, atol=2e-3)
    with pytest.raises(ValueError, match=r"teacher.use_epoch: no checkpoint for epoch 9"):
        teach.load_epoch(model, tmp_path / "ckpt", 9, "cpu")
    # A frozen temperature stays at its value.
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_the_memory_cache_reads_each_shard_once_and_changes_nothing(cache, tmp_path, monkeypatch):
    shards, keys = cache
    cfg, opt = settings(epochs=2)
    reads = []
    real = teacher_pairs.read_pairs
    monkeypatch.setattr(teacher_pairs, "read_pairs", lambda s: reads.append(s) or real(s))
    results = {}
    for name, budget in (("memory", 1 << 30), ("stream", 0)):
        reads.clear()
        d = teacher_pairs.Data(tuple(shards), 8, 0.2, 0, memory_cache_bytes=budget)
        model, history, _ = train(
            cfg, opt, d, 0.07, False, tmp_path / name, torch.device("cpu"), progress=False
        )
        teach.write_targets(model, d, tmp_path / f"{name}.parquet", "cpu", D)
        results[name] = (history, (tmp_path / f"{name}.parquet").read_bytes(), len(reads))
    # In memory: each shard read once; streamed: once per epoch, validation and targets.
    assert results["memory"][2] == len(shards) < results["stream"][2]
    assert results["memory"][0] == results["stream"][0]
    assert results["memory"][1] == results["stream"][1]


# --- targets that are not the pair's own caption, and validation without the leak -----------------


def pair(key, image, caption, region=None):
    c = np.asarray(caption, np.float16)
    r = np.asarray([region if region is not None else caption], np.float16)
    one = np.ones(1, np.float32)
    return teacher_pairs.Pair(key, image, r, one, one, c[None], c, r[0])


def test_unseen_validation_scores_each_target_on_captions_it_did_not_see():
    # Two images, two captions each; the drawn caption of each is fixed by (seed, image).
    e = np.eye(4, dtype=np.float32)
    pairs = [
        pair("a0", "A", e[0], region=e[2]),
        pair("a1", "A", e[1], region=e[2]),
        pair("b0", "B", e[2], region=e[0]),
        pair("b1", "B", e[3], region=e[0]),
    ]
    # A "teacher" that returns the pair's own caption: the paper's leak in its purest form.
    own = torch.tensor(np.stack([p.caption for p in pairs]), dtype=torch.float32)
    paper = teacher_validation.unseen_validation(own, pairs, "paper", seed=0)
    # Scored against the OTHER caption, orthogonal to the drawn one: a tie at 0 everywhere, which
    # counts against the query, so R@1 is 0 — not the 1.0 that scoring the seen caption gives.
    assert paper["images"] == 2 and paper["captions"] == 2
    assert paper["unseen_t2i_R@1"] == 0.0 and paper["cos_own_caption"] == pytest.approx(1.0)
    # other_captions: the mean of the other captions' outputs (here: the other caption), scored
    # against the drawn caption — orthogonal again.
    others = teacher_validation.unseen_validation(own, pairs, "other_captions", seed=0)
    assert others["captions"] == 2 and others["cos_own_caption"] == pytest.approx(0.0)
    # regions: one target per image, scored against all its captions; the base image embedding
    # (here region 0) is scored on the same captions.
    region = torch.tensor(np.stack([p.regions[0] for p in pairs]), dtype=torch.float32)
    reg = teacher_validation.unseen_validation(region, pairs, "regions", seed=0)
    assert reg["captions"] == 4 and reg["unseen_t2i_R@1"] == reg["base_t2i_R@1"]
    assert reg["cos_base_image"] == pytest.approx(1.0)
    # One caption per image leaves nothing unseen for a conditioned target.
    assert teacher_validation.unseen_validation(own[::2], pairs[::2], "paper", seed=0) == {}


def test_other_captions_targets_average_the_image_s_other_pairs(cache, tmp_path):
    shards, keys = cache
    cfg, opt = settings(epochs=1)
    d = data(shards)
    model, _, _ = train(cfg, opt, d, 0.07, True, tmp_path / "ckpt", "cpu", progress=False)
    paper, others = tmp_path / "paper.parquet", tmp_path / "others.parquet"
    teach.write_targets(model, d, paper, "cpu", D, "paper")
    assert teach.write_targets(model, d, others, "cpu", D, "other_captions") == (len(keys), 0)
    own = dict(
        zip(
            pq.read_table(paper).column("key").to_pylist(),
            pq.read_table(paper).column("embedding").to_pylist(),
        )
    )
    got = pq.read_table(others)
    assert got.schema.metadata[b"target"] == b"other_captions"
    row = dict(zip(got.column("key").to_pylist(), got.column("embedding").to_pylist()))
    expected = np.asarray(own["pair-001"], np.float32) + np.asarray(own["pair-002"], np.float32)
    expected /= np.linalg.norm(expected)
    assert np.allclose(row["pair-000"], expected, atol=3e-3)  # pair 0's image holds pairs 0, 1, 2
    assert not np.allclose(row["pair-000"], own["pair-000"], atol=3e-2)


def test_an_image_with_one_caption_has_no_other_captions_target(tmp_path):
    shards, keys = write_cache(tmp_path / "t", n=10, per_image=1)
    cfg, opt = settings(epochs=1)
    d = data(shards)
    model, _, _ = train(cfg, opt, d, 0.07, True, tmp_path / "ckpt", "cpu", progress=False)
    out = tmp_path / "o.parquet"
    assert teach.write_targets(model, d, out, "cpu", D, "other_captions") == (0, 10)
    assert pq.read_table(out).schema.metadata[b"pairs_without_target"] == b"10"
    with pytest.raises(ValueError, match="teacher.target: 'own' is not one of"):
        teach.write_targets(model, d, out, "cpu", D, "own")


def test_a_regions_teacher_reads_no_caption(cache, tmp_path):
    shards, _ = cache
    cfg = TeacherConfig(dim=D, heads=2, inputs="regions")
    opt = optimisation(epochs=1, lr=3e-3, optimizer="adam")
    d = data(shards, prior=True)
    model, history, _ = train(
        cfg, opt, d, 0.07, True, tmp_path / "ckpt", "cpu", progress=False, target="regions"
    )
    assert "val_unseen_t2i_R@1" in history[0]
    pairs = [p for s in shards for p in teacher_pairs.read_pairs(s)][:3]  # one image, three captions
    with torch.no_grad():
        out = model(teacher_pairs.collate(pairs, prior=True))
    assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[0], out[2], atol=1e-6)
    with pytest.raises(ValueError, match="do not go together"):
        train(cfg, opt, d, 0.07, True, tmp_path / "x", "cpu", progress=False, target="paper")


def test_the_best_epoch_is_the_best_on_unseen_captions():
    history = [
        {"epoch": 1, "val_unseen_t2i_R@1": 0.2, "val_unseen_i2t_R@1": 0.4},
        {"epoch": 2, "val_unseen_t2i_R@1": 0.3, "val_unseen_i2t_R@1": 0.5},
        {"epoch": 3, "val_unseen_t2i_R@1": 0.5, "val_unseen_i2t_R@1": 0.3},
    ]
    assert teacher_validation.best_epoch(history) == 2  # a tie on the mean goes to the earlier epoch
    with pytest.raises(ValueError, match="use_epoch: best needs the unseen-caption validation"):
        teacher_validation.best_epoch([{"epoch": 1, "val_loss": 1.0}])

"""pipeline.distill: the cached-vector join, seeded epochs over the curated shards, the frozen text
tower, the no-teacher ablation and exact resume — with the real open_clip demo architecture."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline import distill
from pipeline.losses import DistillWeights
from pipeline.models.clip import create
from pipeline.models.student import frozen_hash
from pipeline.shards import ShardWriter
from pipeline.tables import write_table
from tests.helpers import optimisation

MODEL = "DCLIP-Demo-RN64"
N = 12
WITH_TEACHER = DistillWeights(cos=1.0)


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 112, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def vectors_table(path, key_name, keys, matrix):
    d = matrix.shape[1]
    schema = pa.schema([pa.field(key_name, pa.string()), pa.field("embedding", pa.list_(pa.float16(), d))])
    flat = pa.array(matrix.astype(np.float16).reshape(-1), pa.float16())
    write_table(
        path, pa.table([pa.array(keys), pa.FixedSizeListArray.from_arrays(flat, d)], schema=schema), schema
    )


@pytest.fixture()
def world(tmp_path):
    return make_world(tmp_path)


def make_world(tmp_path):
    """Curated-style shards of N pairs (the last pair lacks a cache entry, as if embed refused
    it) and an embed cache + teacher targets for the others."""
    torch.manual_seed(0)
    model, preprocess, tokenizer = create(MODEL, "none")
    keys = [f"coco-{i:03d}" for i in range(N)]
    captions = [f"a shape number {i}" for i in range(N)]
    with ShardWriter(tmp_path / "train", max_count=5) as w:
        for i, k in enumerate(keys):
            w.write(k, {"jpg": jpeg(i), "txt": captions[i], "json": {"source": "coco", "id": str(i)}})
    cached = keys[:-1]
    with torch.no_grad():
        text = model.encode_text(tokenizer(captions[:-1])).numpy()
    rng = np.random.default_rng(1)
    emb = tmp_path / "embeddings"
    schema = pa.schema(
        [pa.field(n, pa.string()) for n in ("key", "image")]
        + [pa.field("embedding", pa.list_(pa.float16(), 128))]
    )
    flat = pa.array(text.astype(np.float16).reshape(-1), pa.float16())
    table = pa.table(
        [
            pa.array(cached),
            pa.array([f"img{i}" for i in range(N - 1)]),
            pa.FixedSizeListArray.from_arrays(flat, 128),
        ],
        schema=schema,
    )
    write_table(emb / "captions.parquet", table, schema)
    vectors_table(
        emb / "images.parquet", "image", [f"img{i}" for i in range(N - 1)], rng.normal(size=(N - 1, 128))
    )
    vectors_table(tmp_path / "targets.parquet", "key", cached, rng.normal(size=(N - 1, 128)))
    return tmp_path, model, preprocess


def targets(root, anchor=False, teacher="targets.parquet"):
    return distill.Targets.load(root / "embeddings", root / teacher, anchor=anchor)


def shards(root):
    return sorted((root / "train").glob("*.tar"))


def test_the_join_and_a_missing_vector_is_named(world):
    root, _, _ = world
    t = targets(root, anchor=True)
    assert t.captions.get(["coco-003"], "caption").shape == (1, 128)
    assert t.image_of["coco-003"] == "img3"
    with pytest.raises(
        distill.DistillError, match=r"targets\.parquet: no teacher target for pair 'coco-011'"
    ):
        t.teacher.get(["coco-011"], "teacher target")


def test_an_epoch_visits_every_cached_pair_once_in_a_seeded_order(world):
    root, _, preprocess = world
    t = targets(root, anchor=True)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:

        def keys(epoch):
            return [b.keys for b in distill.epoch_batches(shards(root), epoch, 0, 4, preprocess, t, pool)]

        one = keys(1)
        assert sorted(k for b in one for k in b) == [f"coco-{i:03d}" for i in range(N - 1)]
        assert [len(b) for b in one] == [4, 4, 3]
        assert one == keys(1) and one != keys(2)
        batch = next(distill.epoch_batches(shards(root), 1, 0, 4, preprocess, t, pool))
        assert batch.pixels.shape == (4, 3, 64, 64) and batch.base.shape == (4, 128)


def test_a_cached_pair_whose_image_no_longer_decodes_is_an_error(world):
    root, _, preprocess = world
    with ShardWriter(root / "bad", max_count=5) as w:
        w.write("coco-000", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": "x"})
        w.write("coco-001", {"jpg": jpeg(1), "txt": "y"})
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, pytest.raises(distill.DistillError, match=r"sample 'coco-000'"):
        list(
            distill.epoch_batches(
                sorted((root / "bad").glob("*.tar")), 1, 0, 2, preprocess, targets(root), pool
            )
        )


def student_settings(
    weights: DistillWeights = WITH_TEACHER, freeze_batchnorm: bool = True
) -> distill.Settings:
    return distill.Settings(
        trainable_blocks=None,
        freeze_batchnorm=freeze_batchnorm,
        lambda_cos=weights.cos,
        lambda_anchor=weights.anchor,
        batch_size=4,
    )


def train(
    root, model, preprocess, ckpt, weights=WITH_TEACHER, epochs=2, t=None, transform=None, on_step=None
):
    opt = optimisation(epochs=epochs, lr=1e-4, weight_decay=0.1, warmup_steps=1, grad_clip=1.0)
    return distill.train_student(
        model,
        student_settings(weights),
        opt,
        shards(root),
        t or targets(root),
        transform or preprocess,
        ckpt,
        torch.device("cpu"),
        workers=2,
        progress=False,
        on_step=on_step,
    )


def test_the_student_trains_its_image_tower_only(world):
    root, model, preprocess = world
    before_hash = frozen_hash(model)
    visual = {n: p.detach().clone() for n, p in model.visual.named_parameters()}
    seen = []
    model, trainer, text_hash = train(
        root, model, preprocess, root / "ckpt", on_step=lambda step, losses: seen.append((step, losses))
    )
    # on_step sees every optimiser step, in order, with what the trainer records of it
    recorded = [
        (r["step"], {k: v for k, v in r.items() if k not in ("step", "epoch")}) for r in trainer.steps
    ]
    assert seen == recorded
    assert [s for s, _ in seen] == list(range(1, 7))
    assert text_hash == before_hash == frozen_hash(model)
    assert all(not torch.equal(p, visual[n]) for n, p in model.visual.named_parameters())
    assert len(trainer.steps) == trainer.total == 2 * 3 and {
        "contrastive",
        "teacher_cos",
        "total",
        "lr",
    } <= set(trainer.steps[0])


def test_lambda_cos_zero_makes_the_teacher_irrelevant(world):
    root, model, preprocess = world
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(5)
    vectors_table(
        root / "other.parquet", "key", [f"coco-{i:03d}" for i in range(N - 1)], rng.normal(size=(N - 1, 128))
    )
    no_teacher = DistillWeights(cos=0.0)
    a, _, _ = train(root, model, preprocess, root / "a", no_teacher, epochs=1)
    a_state = {k: v.clone() for k, v in a.state_dict().items()}
    model.load_state_dict(state)
    b, _, _ = train(
        root, model, preprocess, root / "b", no_teacher, epochs=1, t=targets(root, teacher="other.parquet")
    )
    assert all(torch.equal(a_state[k], v) for k, v in b.state_dict().items())
    # ... while with the teacher term the targets matter.
    model.load_state_dict(state)
    c, _, _ = train(root, model, preprocess, root / "c", DistillWeights(cos=1.0), epochs=1)
    assert not all(torch.equal(a_state[k], v) for k, v in c.state_dict().items())


def test_a_killed_run_resumes_to_the_same_student(world):
    root, model, preprocess = world
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full, _, _ = train(root, model, preprocess, root / "full")
    full_state = {k: v.clone() for k, v in full.state_dict().items()}

    calls = {"n": 0}

    def dies_in_epoch_two(img):
        calls["n"] += 1
        if calls["n"] > N - 1:  # the first image of epoch 2
            raise KeyboardInterrupt
        return preprocess(img)

    model.load_state_dict(state)
    with pytest.raises(KeyboardInterrupt):
        train(root, model, preprocess, root / "killed", transform=dies_in_epoch_two)
    assert sorted(p.name for p in (root / "killed").iterdir()) == ["epoch-1.pt"]
    model.load_state_dict(state)  # a new process would rebuild the base model
    resumed, trainer, _ = train(root, model, preprocess, root / "killed")
    assert [h["epoch"] for h in trainer.history] == [1, 2]
    assert all(torch.equal(full_state[k], v) for k, v in resumed.state_dict().items())


# --- every caption usable, one per image per step ------------------------------------------------


def test_each_epoch_draws_one_caption_per_image_and_every_caption_gets_its_turn(world):
    root, _, preprocess = world
    t = targets(root)
    # Three captions per image: pairs 0-2 show img-a, 3-5 img-b, …
    shared = {k: f"img-{i // 3}" for i, k in enumerate(sorted(t.captions.index))}
    t = distill.Targets(t.captions, t.teacher, None, shared)
    assert distill.count_images(t) == 4  # 11 cached pairs: 3 + 3 + 3 + 2
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:

        def keys(epoch):
            return [
                k
                for b in distill.epoch_batches(shards(root), epoch, 0, 2, preprocess, t, pool)
                for k in b.keys
            ]

        drawn = [keys(e) for e in range(1, 9)]
        assert drawn[0] == keys(1)  # the same epoch: the same draws, in the same order
    for epoch_keys in drawn:
        images = [shared[k] for k in epoch_keys]
        assert sorted(images) == ["img-0", "img-1", "img-2", "img-3"]  # each image once
    assert len({tuple(sorted(d)) for d in drawn}) > 1  # the drawn captions change with the epoch
    assert set(k for d in drawn for k in d) == set(t.captions.index)  # every caption had its turn
    assert t.drawn_pairs(0, 3) == t.drawn_pairs(0, 3) != t.drawn_pairs(1, 3)


def test_a_drawn_pair_that_no_shard_holds_is_an_error(world):
    root, _, preprocess = world
    from concurrent.futures import ThreadPoolExecutor

    with (
        ThreadPoolExecutor(1) as pool,
        pytest.raises(distill.DistillError, match="in none of the 2 curated shards"),
    ):
        list(distill.epoch_batches(shards(root)[:2], 1, 0, 4, preprocess, targets(root), pool))


def test_batchnorm_statistics_stay_the_base_models(world):
    root, model, preprocess = world
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {n: b.clone() for n, b in model.visual.named_buffers()}
    assert any("running_mean" in n for n in buffers)
    trained, _, _ = train(root, model, preprocess, root / "frozen", epochs=1)
    assert all(torch.equal(b, buffers[n]) for n, b in trained.visual.named_buffers())
    # ... and they would drift without the freeze: the test can fail.
    model.load_state_dict(state)
    opt = optimisation(epochs=1, lr=1e-4, weight_decay=0.1, warmup_steps=1, grad_clip=1.0)
    drifted, _, _ = distill.train_student(
        model, student_settings(freeze_batchnorm=False), opt, shards(root), targets(root), preprocess,
        root / "drift", torch.device("cpu"), workers=2, progress=False,
    )  # fmt: skip
    moved = [
        n for n, b in drifted.visual.named_buffers() if "running_mean" in n and not torch.equal(b, buffers[n])
    ]
    assert moved


def test_pairs_meant_to_go_without_a_teacher_target_are_masked(world):
    root, model, preprocess = world
    keys = [f"coco-{i:03d}" for i in range(N - 1)]
    rng = np.random.default_rng(3)
    d = 128
    schema = pa.schema(
        [pa.field("key", pa.string()), pa.field("embedding", pa.list_(pa.float16(), d))],
        metadata={"target": "other_captions", "pairs_without_target": "3"},
    )
    flat = pa.array(rng.normal(size=(len(keys) - 3, d)).astype(np.float16).reshape(-1), pa.float16())
    table = pa.table([pa.array(keys[3:]), pa.FixedSizeListArray.from_arrays(flat, d)], schema=schema)
    write_table(root / "partial.parquet", table, schema)
    t = targets(root, teacher="partial.parquet")
    assert t.teacher_partial and not targets(root).teacher_partial
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        batches = list(distill.epoch_batches(shards(root), 1, 0, 4, preprocess, t, pool))
    for b in batches:
        assert b.teacher_mask.tolist() == [k not in keys[:3] for k in b.keys]
        assert torch.equal(b.teacher[~b.teacher_mask], torch.zeros((int((~b.teacher_mask).sum()), d)))
    _, trainer, _ = train(root, model, preprocess, root / "partial", epochs=1, t=t)
    assert all(np.isfinite(s["teacher_cos"]) for s in trainer.steps)

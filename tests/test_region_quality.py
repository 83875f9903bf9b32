"""pipeline.region_quality: exact zero-shot accuracy, the sample of distinct images, and the
committed demo CLIP classifying detector-style crops of fresh scenes above chance."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import region_quality as rq
from pipeline.demo.world.paint import PRETRAIN, Job, make_sample
from pipeline.demo.world.scene import SHAPES
from pipeline.models.clip import create
from pipeline.shards import ShardWriter
from pipeline.tables import write_table

from .helpers import REPO


def test_zero_shot_accuracy_exact():
    crops = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert rq.zero_shot_accuracy(crops, classes, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no crops"):
        rq.zero_shot_accuracy(torch.zeros(0, 2), classes, torch.zeros(0, dtype=torch.long))


def fresh_scenes(n: int):
    return [make_sample(Job(PRETRAIN, 20_000_000 + i), 0, (128, 176), 4) for i in range(n)]


@pytest.fixture()
def detected(tmp_path):
    """Curated-style shards of fresh scenes, two pairs per image, and a regions table whose
    boxes and classes are the ground truth (a perfect detector)."""
    scenes = fresh_scenes(24)
    det, train = [], []
    with ShardWriter(tmp_path / "train", max_count=16) as w:
        for i, s in enumerate(scenes):
            for j in range(2):
                key = f"coco-{i:06d}-{j}"
                shard = w.write(key, {"jpg": s.data, "txt": "x"})
                objs = s.scene.objects
                det.append(
                    {
                        "key": key,
                        "shard": shard,  # as detect names it; the manifest has the path
                        "boxes": [list(map(float, o.box)) for o in objs],
                        "classes": [SHAPES.index(o.shape) for o in objs],
                        "class_names": [o.shape for o in objs],
                        "reject": None,
                    }
                )
                train.append({"key": key, "image": f"coco-{i:06d}", "shard": f"train/{shard}"})
    write_table(tmp_path / "regions.parquet", det, pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("classes", pa.list_(pa.int32())), ("class_names", pa.list_(pa.string())), ("reject", pa.string()),
    ]))  # fmt: skip
    write_table(
        tmp_path / "train.parquet",
        train,
        pa.schema([("key", pa.string()), ("image", pa.string()), ("shard", pa.string())]),
    )
    return tmp_path, scenes


def test_the_sample_takes_each_image_once_and_names_every_class(detected):
    root, scenes = detected
    sample, names = rq.sample_images(root / "regions.parquet", root / "train.parquet", 10)
    assert len(sample) == 10 and len({b.key.rsplit("-", 1)[0] for b in sample}) == 10
    assert set(names.values()) == {o.shape for s in scenes for o in s.scene.objects}
    again, _ = rq.sample_images(root / "regions.parquet", root / "train.parquet", 10)
    assert [b.key for b in again] == [b.key for b in sample]
    every, _ = rq.sample_images(root / "regions.parquet", root / "train.parquet", 1000)
    assert len(every) == len(scenes)


def test_the_demo_clip_reads_crops_of_fresh_scenes_above_chance(detected):
    root, _ = detected
    model, preprocess, tokenizer = create(
        "DCLIP-Demo-RN64", str(REPO / "demo" / "weights" / "clip-DCLIP-Demo-RN64.pt")
    )
    sample, names = rq.sample_images(root / "regions.parquet", root / "train.parquet", 24)
    out = rq.measure(model.eval(), preprocess, tokenizer, root, sample, names, [0.0, 0.5])
    assert out["images"] == 24 and out["crops"] == sum(len(b.classes) for b in sample)
    assert out["chance"] == round(1 / len(names), 4)
    assert set(out["accuracy_by_margin"]) == {"0.0", "0.5"}
    assert max(out["accuracy_by_margin"].values()) > 3 * out["chance"]


def test_regions_older_than_the_curated_shards_are_named(detected):
    root, _ = detected
    train = pq.read_table(root / "train.parquet")
    write_table(root / "old.parquet", train.slice(2), train.schema)  # lacks the first image's pairs
    with pytest.raises(ValueError, match=r"key 'coco-000000-0' is not in .*old\.parquet: .*run detect again"):
        rq.sample_images(root / "regions.parquet", root / "old.parquet", 5)

"""`dclip search`: a folder's index kept by content, exact and approximate search, and the rank of
a test caption's true image equal to the place the evaluation gave it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import search
from pipeline.models.clip import load_encoder
from pipeline.shards import read_shard
from stages import search as search_stage

from .helpers import REPO

MODEL = "DCLIP-Demo-RN64"
WEIGHTS = str(REPO / "demo" / "weights" / "clip-DCLIP-Demo-RN64.pt")


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(MODEL, WEIGHTS, "cpu")


def index_of(folder: Path, encoder, cache: Path) -> search.Index:
    return search.build_index(
        folder,
        f"{MODEL}|{encoder.digest}",
        lambda batch: encoder.encode_images(torch.stack(batch)),
        encoder.preprocess,
        cache,
    )


@pytest.fixture()
def folder(tiny_world, tmp_path) -> Path:
    """Thirty of the demo world's Flickr30k images, one in a subfolder."""
    out = tmp_path / "images"
    (out / "sub").mkdir(parents=True)
    files = sorted((tiny_world / "flickr30k" / "flickr30k-images").glob("*.jpg"))[:30]
    for i, f in enumerate(files):
        shutil.copy(f, out / ("sub" if i == 0 else "") / f.name)
    return out


def test_the_index_is_reused_while_the_folder_is_unchanged_and_rebuilt_when_a_file_changes(
    folder, encoder, tmp_path
):
    cache = tmp_path / "cache"
    first = index_of(folder, encoder, cache)
    assert first.built and len(first.paths) == 30 and first.paths[-1].startswith("sub/")
    again = index_of(folder, encoder, cache)
    assert not again.built and again.key == first.key and again.paths == first.paths
    assert (again.embeddings == first.embeddings).all()
    # One file's bytes change (same name, same size or not): another key, a new index.
    victim = folder / first.paths[3]
    other = folder / first.paths[4]
    victim.write_bytes(other.read_bytes())
    changed = index_of(folder, encoder, cache)
    assert changed.built and changed.key != first.key
    assert (changed.embeddings[3] == changed.embeddings[4]).all()
    # A file that is not an image is left out and named, never embedded.
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with_bad = index_of(folder, encoder, cache)
    assert with_bad.built and "broken.jpg" not in with_bad.paths
    assert [p for p, _ in with_bad.rejected] == ["broken.jpg"]
    assert with_bad.rejected[0][1].startswith("not_an_image")
    assert len(list(cache.glob("*.npz"))) == 3


def test_approximate_search_finds_what_exact_search_finds_on_a_small_folder(folder, encoder, tmp_path):
    cache = tmp_path / "cache"
    index = index_of(folder, encoder, cache)
    queries = encoder.encode_texts(
        ["a red circle", "two blue squares", "a green star on the left"], normalize=True
    )
    exact = search.search(index, queries, 5, approximate=False)
    approx = search.search(index, queries, 5, approximate=True, cache=cache)
    assert [[h.path for h in q] for q in approx] == [[h.path for h in q] for q in exact]
    assert all(abs(a.score - e.score) < 1e-5 for qa, qe in zip(approx, exact) for a, e in zip(qa, qe))
    assert [h.rank for h in exact[0]] == [0, 1, 2, 3, 4]
    assert (cache / f"{index.key}.usearch").is_file()  # built once, kept beside the embeddings
    again = search.search(index, queries, 5, approximate=True, cache=cache)
    assert [[h.path for h in q] for q in again] == [[h.path for h in q] for q in exact]


@pytest.mark.e2e
def test_a_test_caption_s_image_comes_at_the_place_the_evaluation_gave_it(reproduced, tmp_path, capsys):
    """The demo's COCO test images as a plain folder, searched with the base CLIP for each test
    caption: the true image's rank is the place in evaluate@base's queries table."""
    root = reproduced.root
    curated = root / "data" / "curated"
    rows = pq.read_table(curated / "eval" / "coco" / "test.parquet").to_pylist()
    folder = tmp_path / "coco-test"
    folder.mkdir()
    for shard in sorted({r["shard"] for r in rows}):
        for key, sample in read_shard(curated / shard):
            (folder / f"{key}.jpg").write_bytes(sample["jpg"])
    captions = [(f"{r['key']}.jpg", c) for r in rows for c in r["captions"]]
    places = {
        r["query"]: r["place"]
        for r in pq.read_table(root / "metrics" / "queries" / "base.parquet").to_pylist()
        if (r["dataset"], r["task"]) == ("coco", "text_to_image")
    }
    sheet = tmp_path / "sheet.html"
    hits = search_stage.run(
        [c for _, c in captions],
        folder,
        "data/weights/clip.pt",
        root / "params.yaml",
        top_k=len(rows),
        html=sheet,
        cache=tmp_path / "cache",
        progress=False,
    )
    ranks = [next(h.rank for h in found if h.path == path) for (path, _), found in zip(captions, hits)]
    assert ranks == [places[q] for q in range(len(captions))]
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == captions[0][1]
        and out[1].startswith("  1\t")
        and len(out) == len(captions) * (len(rows) + 1)
    )
    assert sheet.read_text().count("<img ") == len(captions) * len(rows)

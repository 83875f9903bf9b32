"""pipeline.sources.sugarcrepe on the real SugarCrepe files (read in place from ../shared) and on
malformed copies."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.sources import SourceError, read_sugarcrepe
from pipeline.sources.sugarcrepe import CATEGORIES
from tests.helpers import REPO

REAL = REPO.parent / "shared" / "benchmarks" / "sugarcrepe"
COUNTS = {
    "add_att": 692,
    "add_obj": 2062,
    "replace_att": 788,
    "replace_obj": 1652,
    "replace_rel": 1406,
    "swap_att": 666,
    "swap_obj": 245,
}


@pytest.mark.skipif(not REAL.is_dir(), reason="the SugarCrepe files live in ../shared")
def test_the_real_files():
    items = read_sugarcrepe(REAL)
    assert Counter(i.category for i in items) == COUNTS
    first = items[0]
    assert first.category == "add_att" and first.index == "0"
    assert first.filename.endswith(".jpg") and len(first.filename) == len("000000000000.jpg")
    assert all(i.caption != i.negative_caption for i in items)


def test_the_documented_checksums_are_those_of_the_real_files():
    # docs/real-data.md has users check their download against docs/sugarcrepe.sha256.
    import hashlib

    listed = dict(
        reversed(line.split("  ")) for line in (REPO / "docs" / "sugarcrepe.sha256").read_text().splitlines()
    )
    assert sorted(listed) == sorted(f"sugarcrepe/{c}.json" for c in CATEGORIES)
    if not REAL.is_dir():
        pytest.skip("the SugarCrepe files live in ../shared")
    for name, digest in listed.items():
        assert hashlib.sha256((REAL / name.split("/")[1]).read_bytes()).hexdigest() == digest, name


def write(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for c in CATEGORIES:
        (folder / f"{c}.json").write_text(json.dumps(docs.get(c, {})))


def test_a_hand_written_probe_in_file_order(tmp_path):
    item = {
        "filename": "000000000139.jpg",
        "caption": "A cat on a mat.",
        "negative_caption": "A mat on a cat.",
    }
    write(tmp_path, {"swap_obj": {"5": item, "2": {**item, "filename": "000000000285.jpg"}}})
    items = read_sugarcrepe(tmp_path)
    assert [(i.category, i.index, i.filename) for i in items] == [
        ("swap_obj", "5", "000000000139.jpg"),
        ("swap_obj", "2", "000000000285.jpg"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([], r"swap_att\.json: \(top level\): expected an object, got list"),
        ({"0": {"filename": "a.jpg", "caption": "x"}}, r"swap_att\.json: 0\.negative_caption: missing"),
        (
            {"0": {"filename": "a.jpg", "caption": 3, "negative_caption": "y"}},
            r"0\.caption: expected a string",
        ),
        ({"0": {"filename": " ", "caption": "x", "negative_caption": "y"}}, r"0\.filename: empty"),
    ],
)
def test_malformed_files_name_the_file_and_key(tmp_path, content, message):
    write(tmp_path, {})
    (tmp_path / "swap_att.json").write_text(json.dumps(content))
    with pytest.raises(SourceError, match=message):
        read_sugarcrepe(tmp_path)


def test_a_missing_category_is_named(tmp_path):
    write(tmp_path, {})
    (tmp_path / "replace_rel.json").unlink()
    with pytest.raises(SourceError, match=r"missing SugarCrepe file\(s\): replace_rel\.json"):
        read_sugarcrepe(tmp_path)


def test_the_demo_worlds_probe_reads_back(tiny_world):
    items = read_sugarcrepe(tiny_world / "sugarcrepe")
    assert len(items) == 7 * 4

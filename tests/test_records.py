"""A stage's record split into figures and info (pipeline/records.py), and put back together."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pipeline.records import merge, split

INFO = frozenset({"images", "chance", "device"})


def test_info_keys_go_to_info_at_any_depth_with_what_they_hold():
    record = {
        "retrieval": {
            "coco": {"images": 5, "chance": {"R@1": 0.2}, "text_to_image": {"R@1": 0.4, "MRR": 0.5}},
            "flickr30k": {"images": 3},
        },
        "device": "cpu",
        "epochs": [{"epoch": 1, "images": 9}],  # a list is one value: it stays whole
    }
    figures, info = split(record, INFO)
    assert figures == {
        "retrieval": {"coco": {"text_to_image": {"R@1": 0.4, "MRR": 0.5}}},
        "epochs": [{"epoch": 1, "images": 9}],
    }
    assert info == {
        "retrieval": {"coco": {"images": 5, "chance": {"R@1": 0.2}}, "flickr30k": {"images": 3}},
        "device": "cpu",
    }


def test_merging_parts_of_two_records_is_an_error():
    with pytest.raises(ValueError, match="'R@1' is in both parts"):
        merge({"coco": {"R@1": 0.4}}, {"coco": {"R@1": 0.5}})


keys = st.sampled_from(["images", "chance", "device", "R@1", "coco", "loss", "epochs"])
records = st.recursive(
    st.one_of(
        st.integers(), st.floats(allow_nan=False), st.text(max_size=3), st.lists(st.integers(), max_size=2)
    ),
    lambda children: st.dictionaries(keys, children, min_size=1, max_size=4),
    max_leaves=12,
).filter(lambda r: isinstance(r, dict))


def _no_empty_dicts(node) -> bool:
    return not isinstance(node, dict) or (bool(node) and all(_no_empty_dicts(v) for v in node.values()))


@given(records)
def test_split_then_merge_gives_the_record_back(record):
    assume(_no_empty_dicts(record))  # an empty dict holds no value for either part to keep
    figures, info = split(record, INFO)
    assert merge(figures, info) == record
    assert not set(_keys(figures)) & INFO  # no info key left among the figures


def _keys(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _keys(v)

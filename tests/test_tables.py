"""pipeline.tables: exact round trip, byte-identical rewrites, checked rows, atomic replacement."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.tables as tables
from pipeline.tables import write_table

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("score", pa.float16()),
    ]
)

ROWS = [
    {"key": "000001", "width": 224, "caption": "a red square", "score": 0.5},
    {"key": "000002", "width": 298, "caption": None, "score": None},
    {"key": "000003", "width": 224, "caption": "un carré bleu", "score": -1.25},
]


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_round_trip(tmp_path):
    path = write_table(tmp_path / "sub" / "manifest.parquet", ROWS, SCHEMA)
    assert path == tmp_path / "sub" / "manifest.parquet"
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    assert table.to_pylist() == ROWS
    assert listing(tmp_path / "sub") == ["manifest.parquet"]


def test_same_rows_give_the_same_bytes(tmp_path):
    first = write_table(tmp_path / "a.parquet", ROWS, SCHEMA).read_bytes()
    second = write_table(tmp_path / "b.parquet", [dict(reversed(list(r.items()))) for r in ROWS], SCHEMA)
    third = write_table(tmp_path / "c.parquet", pa.Table.from_pylist(ROWS, schema=SCHEMA), SCHEMA)
    assert first == second.read_bytes() == third.read_bytes()
    assert first[:4] == first[-4:] == b"PAR1"
    changed = write_table(tmp_path / "d.parquet", ROWS[:2], SCHEMA).read_bytes()
    assert changed != first


def test_snappy_and_fixed_writer_options(tmp_path):
    meta = pq.ParquetFile(write_table(tmp_path / "t.parquet", ROWS, SCHEMA)).metadata
    assert (meta.num_rows, meta.num_row_groups, meta.format_version) == (3, 1, "2.6")
    assert {meta.row_group(0).column(i).compression for i in range(4)} == {"SNAPPY"}


def test_empty_rows_give_an_empty_table_with_the_schema(tmp_path):
    table = pq.read_table(write_table(tmp_path / "rejects.parquet", [], SCHEMA))
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


def test_a_table_is_cast_to_the_schema(tmp_path):
    loose = pa.table({"key": ["k"], "width": pa.array([7], pa.int64()), "caption": ["c"], "score": [0.25]})
    table = pq.read_table(write_table(tmp_path / "t.parquet", loose, SCHEMA))
    assert table.schema.equals(SCHEMA)
    assert table.to_pylist() == [{"key": "k", "width": 7, "caption": "c", "score": 0.25}]


def test_a_table_with_other_columns_is_refused(tmp_path):
    other = pa.table({"key": ["k"], "caption": ["c"], "width": [1], "score": [0.0]})
    with pytest.raises(ValueError, match=r"table columns \['key', 'caption', 'width', 'score'\] differ"):
        write_table(tmp_path / "t.parquet", other, SCHEMA)
    assert listing(tmp_path) == []


def test_a_row_with_a_missing_or_misspelt_column_is_refused(tmp_path):
    rows = [ROWS[0], {"key": "k", "width": 1, "captoin": "c", "score": None}]
    with pytest.raises(ValueError) as info:
        write_table(tmp_path / "t.parquet", rows, SCHEMA)
    assert str(info.value) == "row 1: missing columns ['caption'], unexpected columns ['captoin']"
    assert listing(tmp_path) == []


def test_a_null_in_a_non_nullable_column_is_refused(tmp_path):
    rows = [ROWS[0], ROWS[1], {**ROWS[2], "width": None}]
    with pytest.raises(ValueError) as info:
        write_table(tmp_path / "t.parquet", rows, SCHEMA)
    assert str(info.value) == "row 2: column 'width' is not nullable but is null"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = write_table(tmp_path / "t.parquet", ROWS, SCHEMA)
    before = path.read_bytes()

    def dies_half_way(table, where, **kwargs):
        where.write(b"PAR1 half a table")
        raise OSError("disk full")

    monkeypatch.setattr(tables.pq, "write_table", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_table(path, ROWS[:1], SCHEMA)
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["t.parquet"]


def test_the_file_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_table(tmp_path / "t.parquet", ROWS, SCHEMA)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_concat_parquet_streams_parts_in_order_one_row_group_each(tmp_path):
    a = write_table(tmp_path / "a.parquet", ROWS[:2], SCHEMA)
    empty = write_table(tmp_path / "e.parquet", [], SCHEMA)
    b = write_table(tmp_path / "b.parquet", ROWS[2:], SCHEMA)
    out = tables.concat_parquet(tmp_path / "out" / "all.parquet", [a, empty, b], SCHEMA)
    assert pq.read_table(out).to_pylist() == ROWS
    assert pq.ParquetFile(out).metadata.num_row_groups == 2
    again = tables.concat_parquet(tmp_path / "again.parquet", [a, empty, b], SCHEMA)
    assert out.read_bytes() == again.read_bytes()
    assert listing(tmp_path / "out") == ["all.parquet"]
    none = tables.concat_parquet(tmp_path / "none.parquet", [], SCHEMA)
    assert pq.read_table(none).schema.equals(SCHEMA) and pq.read_table(none).num_rows == 0


def test_concat_parquet_refuses_a_part_of_another_schema_and_leaves_nothing(tmp_path):
    other = pa.schema([pa.field("key", pa.string())])
    bad = write_table(tmp_path / "bad.parquet", [{"key": "x"}], other)
    with pytest.raises(ValueError, match="differ from the schema"):
        tables.concat_parquet(tmp_path / "out.parquet", [bad], SCHEMA)
    assert listing(tmp_path) == ["bad.parquet"]


def test_atomic_file_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    from pipeline.files import atomic_file

    path = tmp_path / "sub" / "out.txt"
    with atomic_file(path) as tmp:
        tmp.write_text("whole")
    assert path.read_text() == "whole"
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "whole" and sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_atomic_torch_save_bytes_do_not_depend_on_the_file_name_and_load_back(tmp_path):
    import io

    import torch

    from pipeline.files import atomic_torch_save

    obj = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3), "epoch": 3}
    atomic_torch_save(obj, tmp_path / "a.pt")
    atomic_torch_save(obj, tmp_path / "sub" / "student-other-name.pt")
    reference = io.BytesIO()
    torch.save(obj, reference)  # a file object: torch names the archive "archive"
    a = (tmp_path / "a.pt").read_bytes()
    assert a == (tmp_path / "sub" / "student-other-name.pt").read_bytes() == reference.getvalue()
    back = torch.load(tmp_path / "a.pt")
    assert back["epoch"] == 3 and torch.equal(back["w"], obj["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "sub"]  # no temporary left

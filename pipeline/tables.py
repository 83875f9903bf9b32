"""Parquet tables, written atomically and deterministically.

`write_table` writes to a hidden temporary file in the destination folder and renames it over the
destination, so a reader (or DVC) never sees half a table. The same rows and schema give the same
bytes (snappy, fixed writer options; Parquet stores no timestamps), so DVC's hashes and downstream
skipping work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import atomic_file

# Spelled out rather than left to pyarrow's defaults, which may change between versions.
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "snappy",
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
    "row_group_size": 1 << 20,
}


def to_table(rows_or_table: pa.Table | Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """A table with exactly `schema`. Rows must have exactly the schema's columns: pyarrow would
    silently drop an unknown key and fill a missing one with null, which hides a misspelt column.
    A table must have the schema's column names in order; its types are cast to the schema's.
    A null in a non-nullable column is an error (ValueError naming the row and column)."""
    if isinstance(rows_or_table, pa.Table):
        table = rows_or_table
        if table.schema.names != schema.names:
            raise ValueError(f"table columns {table.schema.names} differ from the schema's {schema.names}")
        if not table.schema.equals(schema, check_metadata=True):
            table = table.cast(schema)
    else:
        names = set(schema.names)
        rows = list(rows_or_table)
        for i, row in enumerate(rows):
            if row.keys() != names:
                missing, extra = sorted(names - row.keys()), sorted(row.keys() - names)
                raise ValueError(f"row {i}: missing columns {missing}, unexpected columns {extra}")
        table = pa.Table.from_pylist(rows, schema=schema)
    # from_pylist accepts None in a non-nullable column without a word; Parquet would then store it.
    for fld in schema:
        if not fld.nullable and table.column(fld.name).null_count:
            first = table.column(fld.name).is_null().to_pylist().index(True)
            raise ValueError(f"row {first}: column {fld.name!r} is not nullable but is null")
    return table


def write_table(
    path: Path | str, rows_or_table: pa.Table | Iterable[Mapping[str, Any]], schema: pa.Schema
) -> Path:
    """Write rows (dicts keyed by column) or a table to `path` as Parquet, atomically; an empty
    input gives a table with the schema and no rows. Returns the path."""
    path = Path(path)
    table = to_table(rows_or_table, schema)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # open(): keeps the umask's permissions
        pq.write_table(table, f, **WRITE_OPTIONS)
        f.flush()
        os.fsync(f.fileno())
    return path


def concat_parquet(path: Path | str, parts: Iterable[Path | str], schema: pa.Schema) -> Path:
    """Parquet files that each hold `schema` into one table at `path`, in order, atomically and
    streaming: memory holds one part. Each non-empty part becomes its own row group, so the bytes
    depend only on the parts. No parts gives a table with the schema and no rows."""
    path = Path(path)
    options = {k: v for k, v in WRITE_OPTIONS.items() if k != "row_group_size"}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        with pq.ParquetWriter(f, schema, **options) as writer:
            for part in parts:
                table = to_table(pq.read_table(part), schema)
                if table.num_rows:
                    writer.write_table(table, row_group_size=WRITE_OPTIONS["row_group_size"])
        f.flush()
        os.fsync(f.fileno())
    return path

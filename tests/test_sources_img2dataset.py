"""The img2dataset reader (pipeline/sources/img2dataset.py): tar shards streamed sample by sample,
the failures in the parquet beside them, malformed shards, and the demo world's CC read back."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.sources import SourceError, WebSample, iter_shards, read_failures

from .helpers import TINY_WORLD

# --- img2dataset shards ----------------------------------------------------------------------


def image_bytes(fmt: str, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def meta(key: str, caption: str) -> dict:
    return {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success"}


def test_iter_shards_groups_members_by_key(tmp_path):
    jpg, png, webp = image_bytes("JPEG", (255, 0, 0)), image_bytes("PNG", (0, 255, 0)), b"RIFF\x00\x00WEBP"
    m0, m1, m2 = (
        meta("000000000", "a red box"),
        meta("000000001", "Ünïcode green"),
        meta("000000002", "no image"),
    )
    write_tar(
        tmp_path / "00001.tar",  # written first, read second: shards come in name order
        [("000010000.webp", webp)],
    )
    write_tar(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", jpg),
            ("000000000.txt", b"a red box"),
            ("000000000.json", json.dumps(m0).encode()),
            ("000000000.exif.npy", b"\x93NUMPY"),  # not ours: ignored
            ("000000001.json", json.dumps(m1).encode()),
            ("000000001.PNG", png),
            ("000000001.txt", "Ünïcode green".encode()),
            ("000000002.txt", b"no image"),
            ("000000002.json", json.dumps(m2).encode()),
        ],
    )
    (tmp_path / "00000.parquet").write_bytes(b"")  # only tars are read here
    assert list(iter_shards(tmp_path)) == [
        WebSample("00000", "000000000", jpg, "a red box", m0),
        WebSample("00000", "000000001", png, "Ünïcode green", m1),
        WebSample("00000", "000000002", None, "no image", m2),
        WebSample("00001", "000010000", webp, None, {}),
    ]
    assert list(iter_shards(tmp_path / "empty")) == []


def test_iter_shards_streams(tmp_path):
    write_tar(tmp_path / "00000.tar", [("000000000.jpg", b"\xff\xd8"), ("000000001.jpg", b"\xff\xd8")])
    (tmp_path / "00001.tar").write_bytes(b"this is no tar" * 100)
    samples = iter_shards(tmp_path)
    assert [next(samples).key, next(samples).key] == ["000000000", "000000001"]  # before the bad shard
    with pytest.raises(SourceError, match=r"00001\.tar: not a readable tar file"):
        next(samples)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("000000003.json", b'{"caption": "cut')], "key '000000003': .json: not valid JSON: "),
        ([("000000003.json", b"[1, 2]")], "key '000000003': .json: expected an object, got list"),
        ([("000000003.txt", b"\xff\xfe caption")], "key '000000003': .txt: not UTF-8 text: "),
        ([("000000003.jpg", b"1"), ("000000003.png", b"2")], "key '000000003': a second image member (.png)"),
        (
            [("000000003.jpg", b"1"), ("000000004.jpg", b"2"), ("000000003.txt", b"late")],
            "key '000000003': its members are not contiguous",
        ),
    ],
)
def test_malformed_shard_names_shard_and_key(tmp_path, members, message):
    path = write_tar(tmp_path / "00007.tar", members)
    with pytest.raises(SourceError) as err:
        list(iter_shards(tmp_path))
    assert str(err.value).startswith(f"{path}: {message}")


def test_a_file_that_is_not_a_tar_is_a_source_error(tmp_path):
    path = tmp_path / "00000.tar"
    path.write_bytes(b"\x01" * 3000)
    with pytest.raises(SourceError, match="^" + re.escape(f"{path}: not a readable tar file: ")):
        list(iter_shards(tmp_path))


def partial_download(folder: Path) -> tuple[Path, list[int]]:
    """An img2dataset shard of samples 0-4 (4 listed as downloaded in the parquet but never
    written to the tar, as when img2dataset dies), key 5 failed; and where each sample starts."""
    members = []
    for i in range(4):
        key = f"{i:09d}"
        members += [(f"{key}.jpg", image_bytes("JPEG", (i, 0, 0))), (f"{key}.txt", f"c{i}".encode())]
        members.append((f"{key}.json", json.dumps(meta(key, f"c{i}")).encode()))
    path = write_tar(folder / "00000.tar", members)
    write_rows(
        folder / "00000.parquet",
        [row(f"{i:09d}", "success") for i in range(5)] + [row("000000005", "failed_to_download", "404")],
    )
    with tarfile.open(path) as tar:
        starts = [m.offset for m in tar.getmembers() if m.name.endswith(".jpg")]
    return path, starts


def test_a_partial_shard_gives_its_whole_samples_and_marks_the_rest_truncated(tmp_path):
    # Before: the first unreadable byte stopped the whole run with a SourceError.
    path, starts = partial_download(tmp_path)
    path.write_bytes(path.read_bytes()[: starts[2] + 700])  # a download killed inside sample 2
    out = list(iter_shards(tmp_path))
    assert [(s.key, s.truncated is None, s.image is not None) for s in out] == [
        ("000000000", True, True),
        ("000000001", True, True),
        ("000000002", False, False),  # the sample the cut went through
        ("000000003", False, False),  # listed as downloaded, not in the tar any more
        ("000000004", False, False),
    ]
    assert out[2].truncated.startswith("00000.tar: the shard is cut short (")


def test_a_shard_cut_at_a_member_boundary_is_partial_too(tmp_path):
    # tarfile alone reads such a shard as whole: the end-of-archive blocks tell it apart.
    path, starts = partial_download(tmp_path)
    path.write_bytes(path.read_bytes()[: starts[3]])
    out = list(iter_shards(tmp_path))
    assert [s.key for s in out if s.truncated is None] == ["000000000", "000000001"]
    # Sample 2 may have lost a member at the cut (nothing says it was whole): refused with 3 and 4.
    assert [s.key for s in out if s.truncated] == ["000000002", "000000003", "000000004"]
    assert out[-1].truncated == "00000.tar: the shard is cut short (no end-of-archive blocks)"


FAILURE_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
    ]
)


def write_rows(path: Path, rows: list[dict], schema: pa.Schema = FAILURE_SCHEMA) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def row(key: str, status: str, error: str | None = None) -> dict:
    return {
        "url": f"https://example.com/{key}.jpg",
        "caption": "c",
        "key": key,
        "status": status,
        "error_message": error,
        "width": 8 if status == "success" else None,
    }


def test_read_failures(tmp_path):
    write_rows(
        tmp_path / "00000.parquet",
        [
            row("000000000", "success"),
            row("000000001", "failed_to_download", "HTTP Error 404: Not Found"),
            row("000000002", "failed_to_resize", "image too small"),
        ],
    )
    write_tar(tmp_path / "00001.tar", [])  # its parquet is missing: fine
    write_rows(tmp_path / "00002.parquet", [row("000020000", "success")])
    assert read_failures(tmp_path) == [
        {
            "shard": "00000",
            "key": "000000001",
            "url": "https://example.com/000000001.jpg",
            "status": "failed_to_download",
            "error_message": "HTTP Error 404: Not Found",
        },
        {
            "shard": "00000",
            "key": "000000002",
            "url": "https://example.com/000000002.jpg",
            "status": "failed_to_resize",
            "error_message": "image too small",
        },
    ]
    assert read_failures(tmp_path / "no-such-folder") == []


def test_read_failures_malformed(tmp_path):
    path = tmp_path / "00000.parquet"
    schema = pa.schema([f for f in FAILURE_SCHEMA if f.name != "status"])
    write_rows(path, [{"key": "0", "url": "u"}], schema)
    with pytest.raises(SourceError) as err:
        read_failures(tmp_path)
    assert str(err.value) == f"{path}: column 'status': missing"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="^" + re.escape(f"{path}: not a readable parquet file: ")):
        read_failures(tmp_path)


# --- the demo world, read back with the reader -----------------------------------------------


def test_demo_world_img2dataset(tiny_world):
    c = TINY_WORLD["cc"]
    samples = list(iter_shards(tiny_world / "cc"))
    n_shards = -(-c["samples"] // c["shard_size"])
    assert len(samples) == c["samples"] - c["failed"]
    assert sorted({s.shard for s in samples}) == [f"{i:05d}" for i in range(n_shards)]
    for s in samples:
        assert s.image is not None and hashlib.sha256(s.image).hexdigest() == s.meta["sha256"]
        assert s.caption == s.meta["caption"] and s.key == s.meta["key"] and s.meta["status"] == "success"
    failures = read_failures(tiny_world / "cc")
    assert len(failures) == c["failed"]
    assert {f["status"] for f in failures} == {"failed_to_download"}
    keys = {s.key for s in samples} | {f["key"] for f in failures}
    assert len(keys) == c["samples"]

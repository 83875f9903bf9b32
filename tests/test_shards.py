"""pipeline.shards: round trip, exact tar headers, byte-identical rewrites, webdataset's own reader,
and atomicity (an interrupted writer leaves no shard that looks whole)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.errors import InputError
from pipeline.shards import ShardError, ShardWriter, count_samples, encode_field, read_shard, verify_shards


def samples(n: int) -> list[tuple[str, dict]]:
    return [
        (
            f"{i:06d}",
            {"txt": f"caption {i} é", "jpg": bytes([i]) * (i + 1), "json": {"id": i, "b": [1, 2], "a": "é"}},
        )
        for i in range(n)
    ]


def write_all(folder, items, max_count):
    with ShardWriter(folder, max_count=max_count) as writer:
        names = [writer.write(key, fields) for key, fields in items]
    return writer.paths, names


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_encode_field():
    assert encode_field(b"\x00\xff") == b"\x00\xff"
    assert encode_field("é") == b"\xc3\xa9"
    assert encode_field({"b": 1, "a": ["é", None]}) == b'{"a":["\xc3\xa9",null],"b":1}'
    with pytest.raises(TypeError, match="a field must be bytes, str, dict or list, got int"):
        encode_field(3)


def test_round_trip_over_several_shards(tmp_path):
    items = samples(5)
    paths, names = write_all(tmp_path, items, max_count=2)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert names == ["00000.tar", "00000.tar", "00001.tar", "00001.tar", "00002.tar"]
    assert sorted(os.listdir(tmp_path)) == ["00000.tar", "00001.tar", "00002.tar"]
    back = [sample for path in paths for sample in read_shard(path)]
    assert [key for key, _ in back] == ["000000", "000001", "000002", "000003", "000004"]
    key, fields = back[3]
    assert fields == {
        "jpg": b"\x03\x03\x03\x03",
        "json": b'{"a":"\xc3\xa9","b":[1,2],"id":3}',
        "txt": b"caption 3 \xc3\xa9",
    }


def test_tar_headers_are_fixed(tmp_path):
    paths, _ = write_all(tmp_path, [("k1", {"txt": "hi", "jpg": b"xy", "cls": "7"})], max_count=10)
    raw = paths[0].read_bytes()
    # Three 512-byte headers, three padded 512-byte bodies, two zero blocks, padded to 10240.
    assert len(raw) == 10240
    assert raw[257:265] == b"ustar\x0000"  # POSIX USTAR magic and version
    with tarfile.open(paths[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["k1.cls", "k1.jpg", "k1.txt"]  # sorted by extension
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (
            0,
            0,
            0,
            "",
            "",
            0o644,
            tarfile.REGTYPE,
        )


def test_same_samples_give_byte_identical_shards(tmp_path):
    first, _ = write_all(tmp_path / "a", samples(5), max_count=3)
    # Same samples, fields given in another order.
    shuffled = [(key, dict(reversed(list(fields.items())))) for key, fields in samples(5)]
    second, _ = write_all(tmp_path / "b", shuffled, max_count=3)
    assert [p.name for p in first] == [p.name for p in second] == ["00000.tar", "00001.tar"]
    assert [digest(p) for p in first] == [digest(p) for p in second]
    third, _ = write_all(tmp_path / "c", samples(4), max_count=3)
    assert digest(third[1]) != digest(first[1])


def test_webdataset_reads_the_shards(tmp_path):
    items = samples(5)
    paths, _ = write_all(tmp_path, items, max_count=2)
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    got = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in dataset]
    expected = [(key, {ext: encode_field(value) for ext, value in fields.items()}) for key, fields in items]
    assert got == expected


def test_an_empty_writer_writes_no_shard(tmp_path):
    folder = tmp_path / "out"
    with ShardWriter(folder, max_count=4) as writer:
        pass
    assert writer.paths == [] and writer.close() == []
    assert not folder.exists()


def test_an_exception_leaves_no_unfinished_shard(tmp_path):
    items = samples(3)
    with pytest.raises(RuntimeError, match="worker died"):
        with ShardWriter(tmp_path, max_count=2) as writer:
            for key, fields in items:
                writer.write(key, fields)
            # 00000.tar is finished; 00001.tar has one sample, under a hidden temporary name only.
            assert sorted(os.listdir(tmp_path)) == ["." + f"00001.tar.tmp-{os.getpid()}", "00000.tar"]
            raise RuntimeError("worker died")
    assert os.listdir(tmp_path) == ["00000.tar"]
    assert [key for key, _ in read_shard(tmp_path / "00000.tar")] == ["000000", "000001"]


def test_a_shard_is_invisible_until_closed(tmp_path):
    writer = ShardWriter(tmp_path, max_count=10)
    writer.write("a", {"txt": "x"})
    assert not (tmp_path / "00000.tar").exists()
    assert writer.close() == [tmp_path / "00000.tar"]
    assert (tmp_path / "00000.tar").exists() and len(os.listdir(tmp_path)) == 1
    with pytest.raises(ValueError, match="write to a closed ShardWriter"):
        writer.write("b", {"txt": "y"})


def test_an_existing_shard_is_not_overwritten(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="00000.tar: already exists; remove the earlier output first"):
        with ShardWriter(tmp_path, max_count=2) as writer:
            writer.write("a", {"txt": "x"})
    assert (tmp_path / "00000.tar").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["00000.tar"]


def test_custom_pattern(tmp_path):
    with ShardWriter(tmp_path, max_count=2, pattern="train-{:03d}.tar") as writer:
        names = [writer.write(key, fields) for key, fields in samples(3)]
    assert names == ["train-000.tar", "train-000.tar", "train-001.tar"]
    with pytest.raises(ValueError, match="must give a distinct plain file name per index"):
        ShardWriter(tmp_path, max_count=2, pattern="train.tar")
    with pytest.raises(ValueError, match="max_count must be a positive integer, got 0"):
        ShardWriter(tmp_path, max_count=0)


@pytest.mark.parametrize(
    "key, fields, error, message",
    [
        (
            "a.b",
            {"txt": "x"},
            ValueError,
            "key 'a.b': must be letters, digits, '_' or '-' (no dot, no slash)",
        ),
        (
            "a/b",
            {"txt": "x"},
            ValueError,
            "key 'a/b': must be letters, digits, '_' or '-' (no dot, no slash)",
        ),
        ("", {"txt": "x"}, ValueError, "key '': must be letters"),
        ("a", {}, ValueError, "key 'a': a sample needs at least one field"),
        ("a", {".txt": "x"}, ValueError, "key 'a': extension '.txt' must be like 'jpg', 'txt' or 'seg.png'"),
        (
            "a",
            {"txt": 3},
            TypeError,
            "key 'a', field 'txt': a field must be bytes, str, dict or list, got int",
        ),
    ],
)
def test_bad_samples_are_refused(tmp_path, key, fields, error, message):
    with ShardWriter(tmp_path, max_count=2) as writer:
        with pytest.raises(error) as info:
            writer.write(key, fields)
    assert str(info.value).startswith(message)
    assert writer.paths == []


def test_a_repeated_key_in_a_shard_is_refused(tmp_path):
    with ShardWriter(tmp_path, max_count=3) as writer:
        writer.write("a", {"txt": "x"})
        with pytest.raises(ValueError, match="key 'a': already written to 00000.tar"):
            writer.write("a", {"txt": "y"})
    assert [key for key, _ in read_shard(tmp_path / "00000.tar")] == ["a"]


def test_extensions_with_dots(tmp_path):
    write_all(tmp_path, [("a", {"seg.png": b"p", "txt": "t"})], max_count=2)
    assert list(read_shard(tmp_path / "00000.tar")) == [("a", {"seg.png": b"p", "txt": b"t"})]


def handmade_tar(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))


def test_read_shard_refuses_non_contiguous_keys(tmp_path):
    handmade_tar(tmp_path / "s.tar", ["a.txt", "b.txt", "a.jpg"])
    with pytest.raises(ValueError, match=r"s.tar: key 'a': its members are not contiguous"):
        list(read_shard(tmp_path / "s.tar"))


def test_read_shard_refuses_a_member_without_extension(tmp_path):
    handmade_tar(tmp_path / "s.tar", ["a.txt", "README"])
    with pytest.raises(ValueError, match=r"s.tar: member 'README': no key or no extension"):
        list(read_shard(tmp_path / "s.tar"))


def test_read_shard_keys_keep_their_folder_as_webdataset_does(tmp_path):
    handmade_tar(tmp_path / "s.tar", ["dir/a.b.txt", "dir/a.b.jpg"])
    assert list(read_shard(tmp_path / "s.tar")) == [("dir/a", {"b.txt": b"x", "b.jpg": b"x"})]


def test_read_shard_refuses_a_file_that_is_not_a_tar(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"\x01" * 1000)
    with pytest.raises(ValueError, match=r"s.tar: not a readable tar file"):
        list(read_shard(tmp_path / "s.tar"))


# --- shards cut short and shards that disagree with their manifest ---------------------------------


def five_samples(folder) -> tuple:
    """A shard of five samples and the byte offset where each sample's first header starts."""
    with ShardWriter(folder, max_count=10) as w:
        for i in range(5):
            w.write(f"k{i}", {"jpg": bytes([i]) * 700, "txt": f"caption {i}"})
    path = folder / "00000.tar"
    with tarfile.open(path) as tar:
        starts = [m.offset for m in tar.getmembers() if m.name.endswith(".jpg")]
    return path, starts


def test_a_shard_cut_at_a_member_boundary_is_refused_not_read_as_shorter(tmp_path):
    # Python's tarfile alone reads such a shard as a whole one of three samples.
    path, starts = five_samples(tmp_path)
    path.write_bytes(path.read_bytes()[: starts[3]])
    with tarfile.open(path, mode="r|") as tar:
        assert len([m for m in tar]) == 6  # what a reader without the end check would accept
    seen = []
    with pytest.raises(ShardError) as err:
        for key, _ in read_shard(path):
            seen.append(key)
    assert str(err.value) == (
        f"{path}: truncated after sample 'k2' (no end-of-archive blocks): a copy or download that "
        "stopped part way, or a writer that was killed; 3 whole sample(s) before the cut"
    )
    assert seen == ["k0", "k1"]  # the last sample before a cut is never handed out
    assert isinstance(err.value, InputError)  # the command line prints it as one `error:` line
    with pytest.raises(ShardError, match="truncated"):
        count_samples(path)


def test_a_shard_cut_mid_member_is_a_shard_error_naming_the_sample(tmp_path):
    path, starts = five_samples(tmp_path)
    path.write_bytes(path.read_bytes()[: starts[2] + 512 + 300])  # inside k2's jpg
    with pytest.raises(ShardError) as err:
        list(read_shard(path))
    assert str(err.value).startswith(f"{path}: truncated in sample 'k2' (2 whole sample(s) before it): ")
    with pytest.raises(ShardError, match="truncated"):
        count_samples(path)


def test_a_shard_cut_inside_a_header_or_its_end_blocks_is_refused(tmp_path):
    path, starts = five_samples(tmp_path)
    whole = path.read_bytes()
    for cut in (starts[4] + 100, len(whole) - 10240 + 1536 + 200):  # mid-header; mid end blocks
        path.write_bytes(whole[:cut])
        with pytest.raises(ShardError, match="truncated"):
            list(read_shard(path))


def manifest_for(path, shards: dict[str, int]) -> None:
    rows = [{"key": f"{s}-{i}", "shard": f"train/{s}"} for s, n in shards.items() for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_verify_shards_checks_every_shard_against_its_manifest(tmp_path):
    folder = tmp_path / "train"
    path, _ = five_samples(folder)
    manifest = tmp_path / "train.parquet"
    manifest_for(manifest, {"00000.tar": 5})
    assert count_samples(path) == 5
    assert verify_shards(folder, manifest) == [path]
    manifest_for(manifest, {"00000.tar": 6})  # a whole tar, one sample short of the manifest
    with pytest.raises(ShardError, match=rf"^{path}: holds 5 sample\(s\), {manifest} lists 6$"):
        verify_shards(folder, manifest)
    manifest_for(manifest, {"00000.tar": 5, "00001.tar": 2})
    with pytest.raises(
        ShardError, match=rf"^{folder}: shard 00001.tar is missing \({manifest} lists 2 samples"
    ):
        verify_shards(folder, manifest)
    manifest_for(manifest, {"00000.tar": 5})
    (folder / "00001.tar").write_bytes(path.read_bytes())  # a stray shard of another run
    with pytest.raises(ShardError, match=rf"^{folder / '00001.tar'}: not in {manifest}"):
        verify_shards(folder, manifest)

"""Sharing pipeline outputs through a DVC remote, with the real DVC: a local directory remote and an
S3-compatible server on loopback (moto's server, through the `dvc-s3` plugin).

One clone pushes its outputs and its run-cache. A second, fresh clone `dvc pull`s and then
`dvc repro` runs nothing, its outputs byte-identical. A third clone whose lock files know nothing
of these results (a colleague's run that was pushed but never committed) fetches the run-cache and
`dvc repro --pull` restores stages from it instead of running them.

What DVC (3.67) can restore from a remote's run-cache: a stage whose every output is kept in the
DVC cache. A `cache: false` output (a metric, plot data or report kept in git) blocks it: the run-
cache entry lists it as an output to check out of the cache, but `dvc push` never uploads it, so
the restore misses it and the stage runs; a stage with a `cache: false` output that is neither a
metric nor a plot gets no run-cache entry at all. The project keeps metrics in git on
purpose (`dvc metrics diff` against any commit, no pull needed), so the third clone checks every
stage that can be restored (with all its upstream): the committed lock files, as in the second
clone, are the way to share the rest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .helpers import sh

pytestmark = [
    pytest.mark.e2e,
    # DVC's stage graph, read in this process, uses a pygtrie call that pygtrie deprecates.
    pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning"),
]

LOCKS = ["dvc.lock", "demo/dvc.lock"]


@dataclass
class Stage:
    outs: dict[str, bool]  # path from the repo root -> whether DVC keeps it in its cache
    upstream: set[str]  # addresses of every stage it depends on, directly or not


def pipeline_stages(repo: Path) -> dict[str, Stage]:
    """Every stage of the pipeline by its address (as `dvc repro` prints it), read by DVC itself."""
    import networkx as nx
    from dvc.repo import Repo

    def address(stage) -> str:  # DVC's `stage.addressing` is relative to the working directory
        dvcfile = Path(stage.path).relative_to(repo).as_posix()
        return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

    with Repo(str(repo)) as dvc:
        graph = dvc.index.graph  # edges point from a stage to the stages it depends on
        return {
            address(stage): Stage(
                outs={Path(out.fs_path).relative_to(repo).as_posix(): out.use_cache for out in stage.outs},
                upstream={address(s) for s in nx.descendants(graph, stage)},
            )
            for stage in graph
        }


def lock_entry(repo: Path, address: str) -> dict:
    """A stage's entry in its lock file."""
    dvcfile, _, name = address.rpartition(":")
    lock = repo / (dvcfile or "dvc.yaml")
    return yaml.safe_load(lock.with_name("dvc.lock").read_text())["stages"][name]


def lock_entry_addresses(repo: Path) -> list[str]:
    """The address of every stage that the lock files list."""
    addresses = []
    for lock in LOCKS:
        prefix = "" if lock == "dvc.lock" else f"{Path(lock).parent}/dvc.yaml:"
        addresses += [prefix + name for name in yaml.safe_load((repo / lock).read_text())["stages"]]
    return addresses


def digests(repo: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under the given outputs (files or directories), by path from the root."""
    found = {}
    for path in paths:
        top = repo / path
        assert top.exists(), f"{path} is missing from {repo}"
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for file in files:
            found[file.relative_to(repo).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def add_remote(repo: Path, name: str, url: str, options: dict[str, str], env: dict) -> None:
    """A default remote in `.dvc/config.local`, which git does not track."""
    sh(["dvc", "remote", "add", "--local", "--default", name, url], repo, env)
    for key, value in options.items():
        sh(["dvc", "remote", "modify", "--local", name, key, value], repo, env)


@contextmanager
def local_remote(repo: Path, name: str, url: str, options: dict[str, str], env: dict) -> Iterator[None]:
    """`add_remote`, with `.dvc/config.local` put back exactly as it was afterwards."""
    config = repo / ".dvc" / "config.local"
    before = config.read_bytes() if config.exists() else None
    try:
        add_remote(repo, name, url, options, env)
        yield
    finally:
        if before is None:
            config.unlink(missing_ok=True)
        else:
            config.write_bytes(before)


def round_trip(
    source: Path, clones: Path, name: str, url: str, options: dict[str, str], env: dict | None = None
) -> None:
    """Push from `source`; pull into fresh clones; `dvc repro` runs nothing in either."""
    env = env or {}
    status = sh(["git", "status", "--porcelain"], source)
    stages = pipeline_stages(source)
    assert set(stages) == set(lock_entry_addresses(source)), "every stage has been reproduced"
    every_out = [p for stage in stages.values() for p in stage.outs]
    expected = digests(source, every_out)
    with local_remote(source, name, url, options, env):
        sh(["dvc", "push", "-r", name, "--run-cache"], source, env)
        assert "in sync" in sh(["dvc", "status", "--cloud", "-r", name], source, env)

    # A fresh clone: no cache, no cached outputs; `dvc pull` brings back every output, nothing runs.
    pulled = clones / "pulled"
    sh(["git", "clone", "-q", str(source), str(pulled)], clones)
    cached_outs = [p for stage in stages.values() for p, cached in stage.outs.items() if cached]
    assert len(cached_outs) >= len(stages) // 2, cached_outs
    assert not any((pulled / p).exists() for p in cached_outs) and not (pulled / ".dvc" / "cache").exists()
    add_remote(pulled, name, url, options, env)
    sh(["dvc", "pull", "-r", name], pulled, env)
    out = sh(["dvc", "repro"], pulled, env)
    assert "Running stage" not in out and "is cached" not in out, out
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], pulled, env)
    assert digests(pulled, every_out) == expected

    # A clone whose lock files do not know these results: only the run-cache does. Each stage that
    # can be restored from it (see the module's note) is, none runs, and DVC writes the committed
    # lock entries. (`dvc pull --run-cache` would fetch the entries too, then fail to check out the
    # outputs that no lock file lists.)
    restorable = {a for a, s in stages.items() if all(s.outs.values())}
    restorable = {a for a in restorable if stages[a].upstream <= restorable}
    # The expensive per-shard stages among them: their counts are a cached info file, not an
    # uncached metrics file (which kept all three out of the run-cache before).
    assert {"curate", "detect", "embed"} <= restorable, stages
    cached = clones / "run-cache"
    sh(["git", "clone", "-q", str(source), str(cached)], clones)
    for lock in LOCKS:
        (cached / lock).unlink()
    add_remote(cached, name, url, options, env)
    sh(["dvc", "fetch", "-r", name, "--run-cache"], cached, env)
    assert any((cached / ".dvc" / "cache" / "runs").iterdir())
    assert not any((cached / p).exists() for p in cached_outs)
    out = sh(["dvc", "repro", "--pull", *sorted(restorable)], cached, env)
    assert "Running stage" not in out, out
    for address in restorable:
        assert f"Stage '{address}' is cached - skipping run, checking out outputs" in out, out
        assert lock_entry(cached, address) == lock_entry(source, address)
    restored = [p for a in restorable for p in stages[a].outs]
    assert digests(cached, restored) == digests(source, restored)
    assert sh(["git", "status", "--porcelain"], source) == status  # the source is as it was


def test_share_through_a_local_directory_remote(reproduced, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    round_trip(reproduced.root, tmp_path, "shared", str(store), {})
    assert (store / "files" / "md5").is_dir() and (store / "runs").is_dir()


@pytest.fixture
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port, for the length of one test."""
    pytest.importorskip("dvc_s3", reason="the dvc-s3 plugin is not installed: pip install -e '.[dev]'")
    server_module = pytest.importorskip(
        "moto.server", reason="moto[server] is not installed: pip install -e '.[dev]'"
    )
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_share_through_an_s3_compatible_remote(reproduced, tmp_path, s3_server):
    import boto3

    credentials = {"aws_access_key_id": "dclip-test", "aws_secret_access_key": "dclip-test-secret"}
    region = "us-east-1"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name=region, **credentials)
    s3.create_bucket(Bucket="dclip")
    # The DVC subprocesses find the dummy credentials in the environment, and nothing of this
    # machine's own AWS set-up.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    env = {
        "AWS_ACCESS_KEY_ID": credentials["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": credentials["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": region,
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }
    round_trip(reproduced.root, tmp_path, "s3remote", "s3://dclip/cache", {"endpointurl": s3_server}, env)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="dclip", Prefix="cache/")
    tops = {o["Key"].split("/")[1] for page in pages for o in page["Contents"]}
    assert {"files", "runs"} <= tops, tops

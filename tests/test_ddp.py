"""Data-parallel training (pipeline/distributed.py, the Trainer, teach, distill, stages/launch.py):
W gloo processes on the CPU take the one-process step on the global batch; InfoNCE sees the
global batch; a killed run resumes exactly; a batch that does not divide is refused; and a stage
with runtime.processes 2 runs itself under torchrun.

The processes are spawned (torch.multiprocessing) with one torch thread each, or started by
torchrun itself; tiny models, tiny data.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from pipeline import distill, distributed, parallel, teach, teacher_pairs
from pipeline.errors import ParamsError
from pipeline.losses import DistillWeights, distill_loss, info_nce
from pipeline.models.teacher import TeacherConfig, TeacherWithScale
from tests.helpers import REPO, optimisation
from tests.test_teach import D, write_cache

# tests.test_distill (make_world) imports open_clip: only where a student is made, so that the
# processes of the other tests start in a second less.
MODEL = "DCLIP-Demo-RN64"


def make_world(root: Path):
    from tests.test_distill import make_world

    return make_world(root)


CPU = torch.device("cpu")


# --- running a function on W spawned gloo processes -----------------------------------------------


def spawn(fn: Callable, world: int, tmp: Path, *args) -> None:
    """fn(rank, *args) on `world` processes joined in a gloo group; an exception in one fails the
    call (torch.multiprocessing stops the others)."""
    store = tmp / f"store-{uuid.uuid4().hex}"
    mp.start_processes(_entry, (world, str(store), fn, args), nprocs=world, start_method="spawn")


def _entry(rank: int, world: int, store: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # two cores, two processes
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    fn(rank, *args)
    dist.barrier()  # nothing in flight when the group goes
    dist.destroy_process_group()


@contextmanager
def captured_gradients() -> Iterator[list[list[torch.Tensor]]]:
    """Every optimiser step's gradients as the optimiser gets them (averaged over the ranks,
    before clipping), in the optimiser's parameter order."""
    grads: list[list[torch.Tensor]] = []
    original = distributed.average_gradients

    def average(params, *args, **kwargs):
        params = list(params)
        original(params, *args, **kwargs)
        grads.append([p.grad.detach().clone() for p in params if p.grad is not None])

    distributed.average_gradients = average  # type: ignore[assignment]
    try:
        yield grads
    finally:
        distributed.average_gradients = original  # type: ignore[assignment]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def state_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --- the teacher ------------------------------------------------------------------------------

TEACHER_BATCH = 8
TEACHER_SETTINGS = teach.Settings(temperature=0.07, learnable_temperature=True, target="paper")


def teacher_data(cache: Path) -> teacher_pairs.Data:
    return teacher_pairs.Data(tuple(sorted(cache.glob("*.tar"))), TEACHER_BATCH, 0.2, 0)


def teacher_run(rank: int, cache: str, out: str) -> None:
    """One epoch of the teacher; its every step's gradients, records and final weights."""
    cfg = TeacherConfig(dim=D, heads=2)
    opt = optimisation(epochs=1, lr=3e-3, optimizer="adam", grad_clip=None)
    steps: list[dict] = []
    with captured_gradients() as grads:
        model, history, _ = teach.train_teacher(
            cfg,
            TEACHER_SETTINGS,
            opt,
            teacher_data(Path(cache)),
            Path(out) / "ckpt",
            CPU,
            on_step=lambda s, r: steps.append(r),
            progress=False,
        )
    torch.save(
        {"grads": grads, "steps": steps, "history": history, "state": model.state_dict()},
        Path(out) / f"rank-{rank}.pt",
    )


def teacher_first_step_gradients(cache: Path, world: int) -> list[torch.Tensor]:
    """The gradient of the first global batch's InfoNCE, each of `world` ranks taking the
    InfoNCE of its own rows alone (the mean of those), as a loss without the gather would."""
    torch.manual_seed(0)  # as train_teacher seeds the model
    model = TeacherWithScale(TeacherConfig(dim=D, heads=2), 0.07, True)
    model.train()
    pairs = next(teacher_pairs.epoch_pairs(teacher_data(cache), 1))
    loss = torch.zeros(())
    for rank in range(world):
        mine, _ = distributed.local_rows(pairs, distributed.Context(rank, world))
        batch = teacher_pairs.collate(mine)
        loss = loss + info_nce(model(batch), batch.caption, model.scale()) / world
    loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_a_teacher_step_on_two_processes_is_the_one_process_step_on_the_global_batch(tmp_path):
    write_cache(tmp_path / "cache", n=57)
    cache = tmp_path / "cache"
    pairs = teacher_pairs.count_training_pairs(teacher_data(cache))
    assert pairs % TEACHER_BATCH % 2 == 1  # a last batch that two processes share unevenly
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    teacher_run(0, str(cache), str(tmp_path / "one"))
    spawn(teacher_run, 2, tmp_path, str(cache), str(tmp_path / "two"))
    one = torch.load(tmp_path / "one" / "rank-0.pt", weights_only=False)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank-{r}.pt", weights_only=False) for r in (0, 1))
    # The replicas are identical, and so are the recorded losses (the global batch's).
    assert r0["steps"] == r1["steps"] and r0["history"] == r1["history"]
    assert state_diff(r0["state"], r1["state"]) == 0.0
    # Each step: the one-process loss and gradients, up to float rounding.
    assert len(r0["grads"]) == len(one["grads"]) == len(one["steps"]) == -(-pairs // TEACHER_BATCH)
    for a, b in zip(r0["steps"], one["steps"]):
        assert a["total"] == pytest.approx(b["total"], abs=1e-5)
    for a, b in zip(r0["grads"], one["grads"]):
        assert max_diff(a, b) < 1e-5
    # The attention's key bias has a gradient of exactly zero (a softmax does not see a shift
    # of all its logits): what is computed there is rounding noise, which Adam scales to steps
    # of the order of the learning rate, in each run its own. Elsewhere the weights agree.
    noise = [k for k in one["state"] if k.endswith("attn.in_proj_bias")]
    assert (
        state_diff(*({k: v for k, v in s.items() if k not in noise} for s in (r0["state"], one["state"])))
        < 1e-5
    )
    assert state_diff(*({k: s[k] for k in noise} for s in (r0["state"], one["state"]))) < 1e-3
    # ... and it is the global batch's InfoNCE that they follow: each rank's InfoNCE over its own
    # rows alone gives another gradient, by far more than the rounding.
    assert max_diff(teacher_first_step_gradients(cache, 1), one["grads"][0]) < 1e-6
    local = teacher_first_step_gradients(cache, 2)
    assert max_diff(local, r0["grads"][0]) > 1e-3 > 100 * max_diff(r0["grads"][0], one["grads"][0])


# --- the student ------------------------------------------------------------------------------

DISTILL_WEIGHTS = DistillWeights(cos=1.0, anchor=0.5)
DISTILL_BATCH = 4  # 11 cached images: batches of 4, 4 and 3 (shared 1 + 2 by two processes)
DISTILL_EPOCHS = 2


def student_settings(batch_size: int = DISTILL_BATCH) -> distill.Settings:
    return distill.Settings(
        trainable_blocks=None,
        freeze_batchnorm=True,
        lambda_cos=DISTILL_WEIGHTS.cos,
        lambda_anchor=DISTILL_WEIGHTS.anchor,
        batch_size=batch_size,
    )


def student(seed: int = 0):
    from pipeline.models.clip import create

    torch.manual_seed(seed)  # make_world's model
    model, preprocess, _ = create(MODEL, "none")
    return model, preprocess


class Killed(Exception):
    """A process dies (not KeyboardInterrupt: torch.multiprocessing takes that for a clean exit)."""


def distill_run(rank: int, root: str, ckpt: str, out: str, kill_at_step: int = 0) -> None:
    """distill.train_student over make_world's data; its every step's gradients, records and
    final weights. `kill_at_step`: dies after that optimiser step."""
    model, preprocess = student()
    targets = distill.Targets.load(Path(root) / "embeddings", Path(root) / "targets.parquet", anchor=True)
    opt = optimisation(epochs=DISTILL_EPOCHS, lr=1e-4, weight_decay=0.1, warmup_steps=1, grad_clip=1.0)

    def on_step(step: int, _: dict) -> None:
        if step == kill_at_step:
            raise Killed(f"rank {rank} after step {step}")

    with captured_gradients() as grads:
        model, trainer, text_hash = distill.train_student(
            model,
            student_settings(),
            opt,
            sorted((Path(root) / "train").glob("*.tar")),
            targets,
            preprocess,
            Path(ckpt),
            CPU,
            workers=1,
            progress=False,
            on_step=on_step,
        )
    record = {"grads": grads, "steps": trainer.steps, "state": model.state_dict(), "text": text_hash}
    torch.save(record, Path(out) / f"rank-{rank}.pt")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """make_world's data; an uninterrupted two-process run and a one-process run of two epochs."""
    root = tmp_path_factory.mktemp("distill")
    make_world(root)
    for name in ("one", "two"):
        (root / name).mkdir()
    distill_run(0, str(root), str(root / "one" / "ckpt"), str(root / "one"))
    spawn(distill_run, 2, root, str(root), str(root / "two" / "ckpt"), str(root / "two"))
    runs = {
        "one": torch.load(root / "one" / "rank-0.pt", weights_only=False),
        "two": [torch.load(root / "two" / f"rank-{r}.pt", weights_only=False) for r in (0, 1)],
    }
    return root, runs


def distill_first_step_gradients(root: Path, world: int) -> list[torch.Tensor]:
    """The gradient of the first global batch's loss, each of `world` ranks taking the loss of
    its own rows alone (the mean of those), as a loss without the gather would."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.models.student import freeze_for_distillation, set_train_mode
    from pipeline.train import decay_groups

    model, preprocess = student()
    freeze_for_distillation(model, None)
    set_train_mode(model, freeze_batchnorm=True)
    targets = distill.Targets.load(root / "embeddings", root / "targets.parquet", anchor=True)
    shards = sorted((root / "train").glob("*.tar"))
    with ThreadPoolExecutor(1) as pool:
        batch = next(
            distill.epoch_batches(
                shards, 1, 0, DISTILL_BATCH, preprocess, targets, pool, ctx=distributed.SINGLE
            )
        )
    scale = model.logit_scale.exp().detach()
    loss = torch.zeros(())
    for rank in range(world):
        rows, _ = distributed.split(len(batch.keys), distributed.Context(rank, world))
        f = distill.student_features(model, batch, CPU)
        f = {k: v[rows.start : rows.stop] for k, v in f.items() if v is not None}
        terms = distill_loss(f["student"], f["text"], f["teacher"], f["base"], scale, DISTILL_WEIGHTS)
        loss = loss + terms["total"] / world
    loss.backward()
    return [p.grad for g in decay_groups(model, 0.1) for p in g["params"]]


def test_a_distill_step_on_two_processes_is_the_one_process_step_on_the_global_batch(distilled):
    root, runs = distilled
    one, (r0, r1) = runs["one"], runs["two"]
    assert r0["steps"] == r1["steps"] and state_diff(r0["state"], r1["state"]) == 0.0
    assert r0["text"] == r1["text"] == one["text"]  # the frozen side, checked on every rank
    assert len(r0["grads"]) == len(one["grads"]) == DISTILL_EPOCHS * 3
    assert {"contrastive", "teacher_cos", "anchor_cos"} <= set(r0["steps"][0])
    for a, b in zip(r0["steps"], one["steps"]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    first = max_diff(r0["grads"][0], one["grads"][0])
    assert first < 1e-5
    # It is the global batch's InfoNCE: each rank's over its own rows gives another gradient.
    assert max_diff(distill_first_step_gradients(root, 1), one["grads"][0]) < 1e-6
    local = distill_first_step_gradients(root, 2)
    assert max_diff(local, r0["grads"][0]) > 1e-4 > 100 * first


def test_two_processes_end_with_the_one_process_weights(distilled):
    _, runs = distilled
    one, (r0, _) = runs["one"], runs["two"]
    base = student()[0].state_dict()
    trained = [k for k in one["state"] if k.startswith("visual.")]
    moved = max(float((r0["state"][k] - base[k]).abs().max()) for k in trained)
    assert moved > 1e-4  # the weights did train (lr 1e-4, six steps), by far more than they differ
    assert state_diff(r0["state"], one["state"]) < 1e-5


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(distilled):
    root, runs = distilled
    ckpt, out = root / "killed" / "ckpt", root / "killed"
    out.mkdir()
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        spawn(distill_run, 2, root, str(root), str(ckpt), str(out), 4)  # dies in epoch 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-1.pt"]
    spawn(distill_run, 2, root, str(root), str(ckpt), str(out))
    resumed = torch.load(out / "rank-1.pt", weights_only=False)
    full = runs["two"][0]
    assert len(resumed["grads"]) == 3  # epoch 2 only
    assert resumed["steps"] == full["steps"]
    assert state_diff(resumed["state"], full["state"]) == 0.0


# --- a last batch of fewer rows than processes ------------------------------------------------------


def stand_in_run(rank: int, out: str) -> None:
    torch.manual_seed(0)
    x, y, a = torch.randn(2, 5), torch.randn(2, 5), torch.nn.Parameter(torch.randn(5, 5))
    rows, counts = distributed.split(2, distributed.current())
    loss = info_nce(
        distributed.gather(x[rows.start : rows.stop] @ a, counts),
        distributed.gather(y[rows.start : rows.stop], counts),
        10.0,
    )
    loss.backward()
    distributed.average_gradients([a])
    torch.save(
        {"rows": rows, "counts": counts, "loss": loss.detach(), "grad": a.grad}, Path(out) / f"rank-{rank}.pt"
    )


def test_a_rank_without_rows_computes_a_stand_in_that_the_global_batch_leaves_out(tmp_path):
    spawn(stand_in_run, 3, tmp_path, str(tmp_path))
    got = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in range(3)]
    assert [g["counts"] for g in got] == [(0, 1, 1)] * 3
    assert [g["rows"] for g in got] == [range(0, 1), range(0, 1), range(1, 2)]  # rank 0: a stand-in
    torch.manual_seed(0)
    x, y, a = torch.randn(2, 5), torch.randn(2, 5), torch.nn.Parameter(torch.randn(5, 5))
    loss = info_nce(x @ a, y, 10.0)
    loss.backward()
    for g in got:
        assert torch.allclose(g["loss"], loss.detach(), atol=1e-6)
        assert torch.allclose(g["grad"], a.grad, atol=1e-6)


def test_shares_are_contiguous_and_as_even_as_they_go():
    def shares(n, world):
        return [distributed.split(n, distributed.Context(r, world)) for r in range(world)]

    assert shares(8, 2) == [(range(0, 4), (4, 4)), (range(4, 8), (4, 4))]
    assert shares(5, 2) == [(range(0, 2), (2, 3)), (range(2, 5), (2, 3))]
    assert [r for r, _ in shares(2, 4)] == [range(0, 1), range(0, 1), range(0, 1), range(1, 2)]
    assert shares(7, 1) == [(range(0, 7), (7,))]


def test_a_rank_decodes_only_its_share_of_each_batch(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path
    _, _, preprocess = make_world(root)
    targets = distill.Targets.load(root / "embeddings", root / "targets.parquet", anchor=False)
    shards = sorted((root / "train").glob("*.tar"))
    decoded: list[int] = []

    def counting(image):
        decoded.append(1)
        return preprocess(image)

    def keys(ctx):
        decoded.clear()
        with ThreadPoolExecutor(1) as pool:
            batches = list(distill.epoch_batches(shards, 1, 0, 4, counting, targets, pool, ctx=ctx))
        return [b.keys for b in batches], [b.counts for b in batches], len(decoded)

    whole, counts, n = keys(distributed.SINGLE)
    assert [len(k) for k in whole] == [4, 4, 3] and counts == [(4,), (4,), (3,)] and n == 11
    shares = [keys(distributed.Context(r, 2)) for r in range(2)]
    for b, batch in enumerate(whole):
        assert shares[0][0][b] + shares[1][0][b] == batch  # rank 0's rows, then rank 1's
    assert shares[0][1] == shares[1][1] == [(2, 2), (2, 2), (1, 2)]
    assert (shares[0][2], shares[1][2]) == (5, 6)  # each decodes its own images only


# --- a batch that does not divide -------------------------------------------------------------------


def test_a_batch_that_does_not_divide_by_the_processes_is_refused_naming_the_param(tmp_path, monkeypatch):
    with pytest.raises(ParamsError, match=r"distill\.batch_size: 6 does not divide by the 4 processes"):
        distributed.check_batch_size(6, 4, "distill.batch_size")
    distributed.check_batch_size(8, 4, "distill.batch_size")
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(0, 2))
    root = tmp_path / "d"
    root.mkdir()
    _, model, preprocess = make_world(root)
    targets = distill.Targets.load(root / "embeddings", root / "targets.parquet", anchor=True)
    with pytest.raises(ParamsError, match=r"distill\.batch_size: 5 does not divide by the 2 processes"):
        distill.train_student(
            model,
            student_settings(5),
            optimisation(),
            [],
            targets,
            preprocess,
            root / "c",
            CPU,
            progress=False,
        )
    shards, _ = write_cache(tmp_path / "cache")
    data = teacher_pairs.Data(tuple(shards), 7, 0.2, 0)
    with pytest.raises(ParamsError, match=r"teacher\.batch_size: 7 does not divide by the 2 processes"):
        teach.train_teacher(
            TeacherConfig(dim=D, heads=2), TEACHER_SETTINGS, optimisation(), data, tmp_path / "t", CPU
        )
    # The stage refuses before it starts any process.
    from stages import launch

    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("launched"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParamsError, match=r"distill\.batch_size: 6 does not divide by the 4 processes"):
        launch.relaunched(Path("params.yaml"), "distill", 4, 6, "distill.batch_size")


# --- launch -------------------------------------------------------------------------------------


def join_a_started_group(rank: int, out: str) -> None:
    """As under Ray Train's TorchTrainer: the group started before the stage, the torchrun
    variables set."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    with distributed.joined("cpu") as (ctx, _):
        gathered = distributed.gather(torch.tensor([[float(rank)]]))
    record = {
        "ctx": [ctx.rank, ctx.world_size],
        "gathered": gathered.tolist(),
        "still": dist.is_initialized(),
    }
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(record))


def test_a_process_group_started_by_the_caller_is_joined_and_left_to_it(tmp_path):
    spawn(join_a_started_group, 2, tmp_path, str(tmp_path))
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [g["ctx"] for g in got] == [[0, 2], [1, 2]]
    assert got[0]["gathered"] == got[1]["gathered"] == [[0.0], [1.0]]
    assert all(g["still"] for g in got)  # not destroyed: the caller's


def test_the_torchrun_command_line(monkeypatch):
    from stages import launch

    argv = launch.command("distill", Path("work/params.yaml"))
    assert argv == ["-m", "stages.cli", "distill", "--params", "work/params.yaml"]
    assert distributed.torchrun_command(8, argv, python="/venv/bin/python") == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "8",
        "-m",
        "stages.cli",
        "distill",
        "--params",
        "work/params.yaml",
    ]
    assert distributed.torchrun_command(2, argv)[0] == sys.executable
    launched: list[tuple] = []
    code = {"value": 0}

    def fake_launch(processes, args):
        launched.append((processes, args))
        return code["value"]

    monkeypatch.setattr(distributed, "launch", fake_launch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    params = Path("work/params.yaml")
    assert not launch.relaunched(params, "train-teacher", 1, 8, "teacher.batch_size") and not launched
    assert launch.relaunched(params, "train-teacher", 2, 8, "teacher.batch_size")
    assert launched == [(2, ["-m", "stages.cli", "train-teacher", "--params", "work/params.yaml"])]
    code["value"] = 3
    with pytest.raises(SystemExit) as exit_:
        launch.relaunched(params, "distill", 2, 8, "distill.batch_size")
    assert exit_.value.code == 3
    # A process that torchrun (or srun) started joins its run instead of launching another.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.relaunched(params, "distill", 2, 8, "distill.batch_size") and len(launched) == 2
    assert distributed.from_env({}) == distributed.SINGLE
    assert distributed.from_env(
        {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    ) == distributed.Context(9, 16, 1, 8)


JOIN_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from pipeline import distributed, parallel
with distributed.joined("cpu") as (ctx, device):
    x = distributed.gather(torch.tensor([[float(ctx.rank)]]))
    record = {"ctx": [ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size],
              "backend": dist.get_backend(), "threads": torch.get_num_threads(), "gathered": x.tolist(),
              "decode": parallel.count("auto")}
    with open(f"{sys.argv[1]}/rank-{ctx.rank}.json", "w") as f:
        json.dump(record, f)
    distributed.barrier()
"""


def test_launch_runs_the_processes_under_torchrun_and_each_joins_the_group(tmp_path, monkeypatch):
    script = tmp_path / "join.py"
    script.write_text(JOIN_SCRIPT)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert distributed.launch(2, [str(script), str(tmp_path)]) == 0
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [g["ctx"] for g in got] == [[0, 2, 0, 2], [1, 2, 1, 2]]
    assert {g["backend"] for g in got} == {"gloo"}
    # torch's threads and the decode workers of runtime.workers "auto": each rank's share of the cores
    assert (
        {g["threads"] for g in got} == {g["decode"] for g in got} == {max(1, parallel.machine_cores() // 2)}
    )
    assert got[0]["gathered"] == got[1]["gathered"] == [[0.0], [1.0]]


# --- the stage through torchrun -------------------------------------------------------------------


def stage_project(root: Path, processes: int) -> Path:
    """make_world's data as a project the distill stage reads, and its params file."""
    from pipeline.models.clip import save_checkpoint
    from pipeline.shards import count_samples

    _, model, _ = make_world(root)
    save_checkpoint(model, root / "weights" / "clip.pt")
    (root / "curated").mkdir()
    (root / "train").rename(root / "curated" / "train")
    shards = sorted((root / "curated" / "train").glob("*.tar"))
    names = [s.name for s in shards for _ in range(count_samples(s))]
    pq.write_table(pa.table({"shard": names}), root / "curated" / "train.parquet")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["clip"].update(model=MODEL, pretrained="weights/clip.pt", checkpoint="weights/clip.pt")
    params["curate"]["out"] = "curated"
    params["embed"]["out"] = "embeddings"
    params["teacher"]["targets"] = "targets.parquet"
    params["distill"].update(
        epochs=DISTILL_EPOCHS,
        batch_size=DISTILL_BATCH,
        lr=1e-4,
        warmup_steps=1,
        lambda_anchor=0.5,
        out="student.pt",
    )
    params["runtime"].update(device="cpu", workers=1, scratch="scratch", processes=processes)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


def test_the_distill_stage_with_two_processes_runs_under_torchrun(tmp_path, capfd):
    from pipeline.models.clip import create
    from stages import distill as stage

    one = stage.run(stage_project(tmp_path / "one", 1), progress=False)
    assert "data-parallel" not in capfd.readouterr().err
    params = stage_project(tmp_path / "two", 2)
    two = stage.run(params, progress=False)
    out, err = capfd.readouterr()
    assert "data-parallel: 2 processes, gloo" in err
    assert out.count('"text_tower_unchanged": true') == 1  # rank 0 alone writes and reports
    assert two["steps"] == one["steps"] == DISTILL_EPOCHS * 3 and two["text_tower_unchanged"]
    assert two["text_tower_sha256"] == one["text_tower_sha256"]
    assert two["final"]["train_total"] == pytest.approx(one["final"]["train_total"], abs=1e-5)
    assert (tmp_path / "two" / "metrics" / "distill" / "plots" / "metrics").is_dir()
    (run,) = (tmp_path / "two" / "scratch" / "distill").iterdir()  # one run key: the 2-process run's
    assert sorted(p.name for p in run.iterdir()) == [f"epoch-{e}.pt" for e in (1, 2)]
    a = create(MODEL, str(tmp_path / "one" / "student.pt"))[0].state_dict()
    b = create(MODEL, str(tmp_path / "two" / "student.pt"))[0].state_dict()
    # Stored in float16 (save_checkpoint): the float32 weights' difference (< 1e-5, as in the
    # tests above) and a float16 rounding step (2^-10 of the value, at most) apart.
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=2**-10, atol=1e-5) for k in a)

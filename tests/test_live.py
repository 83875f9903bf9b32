"""DVCLive curves written while a stage trains, and exactly the finished run's at the end."""

from __future__ import annotations

from pathlib import Path

from stages.outputs import LiveCurves, log_live

RECORDS = [{"step": 1, "total": 2.5, "lr": 0.1}, {"step": 2, "total": 2.0, "lr": 0.05}]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_curves_grow_while_training_and_end_as_the_finished_run_s(tmp_path):
    live = LiveCurves(tmp_path / "live")
    live.log(RECORDS[0])
    # Mid-run: the curve is there with the first step, for `dvc plots show` to follow.
    total = tmp_path / "live" / "plots" / "metrics" / "total.tsv"
    assert total.read_text().splitlines() == ["step\ttotal", "0\t2.5"]
    live.log(RECORDS[1])
    assert len(total.read_text().splitlines()) == 3
    live.finish(RECORDS)
    log_live(tmp_path / "whole", RECORDS)
    assert tree(tmp_path / "live") == tree(tmp_path / "whole")
    assert "metrics.json" not in tree(tmp_path / "live")


def test_a_resumed_run_that_logs_only_its_last_steps_still_ends_with_every_step(tmp_path):
    (tmp_path / "live" / "plots").mkdir(parents=True)
    (tmp_path / "live" / "plots" / "stale.tsv").write_text("left by the killed run\n")
    live = LiveCurves(tmp_path / "live")
    live.log(RECORDS[1])  # the resumed run trains only the last step
    assert not (tmp_path / "live" / "plots" / "stale.tsv").exists()
    live.finish(RECORDS)
    log_live(tmp_path / "whole", RECORDS)
    assert tree(tmp_path / "live") == tree(tmp_path / "whole")

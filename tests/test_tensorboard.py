"""`--tensorboard DIR`: the metrics records as TensorBoard scalars, read back with
TensorBoard's own reader."""

from __future__ import annotations

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from noodle.cli import main
from noodle.progress import Reporter
from noodle.train.metrics import MetricsLog
from tests.tiny_runs import TinyRun, read_metrics


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_train_writes_every_record_as_scalars(tiny_run: TinyRun, tmp_path, one_torch_thread):
    out, log_dir = tmp_path / "model", tmp_path / "board"
    options = ("--max-steps", 20, "--batch-size", 8, "--eval-interval", 10, "--eval-batches", 2)

    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run.train_args(out, *options, "--tensorboard", log_dir))

    assert exit_info.value.code == 0
    records = read_metrics(out)
    for kind, name in (("train", "loss"), ("train", "lr"), ("eval", "val_loss")):
        expected = [(r["step"], r[name]) for r in records if r["kind"] == kind]
        read = scalars(log_dir, f"{kind}/{name}")
        assert [step for step, _ in read] == [step for step, _ in expected]
        assert [value for _, value in read] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_a_resumed_run_hides_what_was_logged_past_its_resume_point(tmp_path):
    path, log_dir = tmp_path / "metrics.jsonl", tmp_path / "board"
    interrupted = MetricsLog(path, str(log_dir))
    for step in (10, 20, 30):
        interrupted.record(kind="train", step=step, loss=float(step))
    interrupted.close()

    resumed = MetricsLog(path, str(log_dir))
    resumed.truncate(20, Reporter(interactive=False, quiet=True))
    resumed.record(kind="train", step=30, loss=3.0)
    resumed.record(kind="train", step=40, loss=4.0)
    resumed.close()

    assert scalars(log_dir, "train/loss") == [(10, 10.0), (20, 20.0), (30, 3.0), (40, 4.0)]


def test_without_tensorboard_installed_train_stops_before_it_starts(
    tiny_run: TinyRun, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an absent package imports as
    out = tmp_path / "model"

    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run.train_args(out, "--tensorboard", tmp_path / "board"))

    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "error: --tensorboard needs the tensorboard package: pip install "
        "'noodle[tensorboard]' (or pip install tensorboard)\n"
    )
    assert list(tmp_path.iterdir()) == []

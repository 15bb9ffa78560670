"""`noodle plot`: the curves read from metrics.jsonl, and images of the asked size."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from noodle.cli import main
from noodle.plot import read_run
from tests.tiny_runs import TinyRun, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def second_run(tiny_run: TinyRun, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plot") / "second"
    options = ("--max-steps", 20, "--batch-size", 8, "--eval-interval", 5, "--eval-batches", 2)
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run.train_args(out, *options, "--lr", 1e-3))
    assert exit_info.value.code == 0
    return out


def test_two_runs_are_drawn_into_a_png_of_the_asked_size(
    trained_base, second_run, tmp_path, cli_in_process
):
    image = tmp_path / "curves.png"

    code, _, stderr = cli_in_process(
        "plot", trained_base, second_run, "-o", image, "--size", "640x480"
    )

    assert code == 0, stderr
    assert png_size(image) == (640, 480)


def test_the_curves_are_the_records_and_the_best_is_the_kept_checkpoint(second_run):
    curves = read_run(str(second_run))
    records = read_metrics(second_run)
    train = [r for r in records if r["kind"] == "train"]
    tokens_per_step = train[0]["tokens_seen"] // train[0]["step"]  # one batch of windows
    evals = [r for r in records if r["kind"] == "eval"]
    training = json.loads((second_run / "model.json").read_text())["training"]

    assert curves.train_loss.tolist() == [r["loss"] for r in train]
    assert curves.lr.tolist() == [r["lr"] for r in train]
    assert curves.val_loss.tolist() == [r["val_loss"] for r in evals]
    # Evaluations every 5 steps, training records every 10: the tokens between are inferred.
    assert curves.eval_tokens.tolist() == [r["step"] * tokens_per_step for r in evals]
    best = curves.best
    assert curves.val_loss[best] == training["best_val_loss"]
    assert evals[best]["step"] == training["best_step"]


def test_without_matplotlib_plot_is_one_error_line(trained_base, tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # what an absent package imports as

    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(trained_base), "-o", str(tmp_path / "curves.png")])

    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "error: noodle plot needs matplotlib: pip install 'noodle[plot]' "
        "(or pip install matplotlib)\n"
    )
    assert list(tmp_path.iterdir()) == []

"""What `noodle` shows while it works: through a pipe, plain lines (a periodic one with the
time elapsed and left, one summary line per stage); on a terminal, a bar that fits 80
columns and acknowledges Ctrl-C at once. A run interrupted before its first evaluation
keeps usable weights, and chat, eval and info say how the run stands."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from noodle import progress
from noodle.progress import Reporter
from tests.conftest import noodle_command, noodle_env, run_noodle, story_corpus
from tests.tiny_runs import TinyRun

DURATION = r"\d+:\d\d:\d\d"
# The terminal run's length: Ctrl-C stops it within its first steps, and its resumption trains
# the rest.
TERMINAL_STEPS = 8
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_plain_line_has_the_count_the_time_and_no_empty_field(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # a line at every update
    task = Reporter(interactive=False).start_task("evaluating", total=4, unit="batches")
    task.advance(1)
    task.advance(1, loss="2.5000")
    task.finish()

    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"evaluating 1/4 batches \| {DURATION} elapsed, {DURATION} left", lines[0])
    assert re.fullmatch(
        rf"evaluating 2/4 batches \| {DURATION} elapsed, {DURATION} left \| loss 2\.5000", lines[1]
    )
    assert re.fullmatch(rf"evaluating done: 2 batches in {DURATION} \| loss 2\.5000", lines[2])
    assert len(lines) == 3


def test_a_silent_reporter_draws_no_bar_even_on_a_terminal(capsys):
    """The later processes of a torchrun run share the first one's terminal: only the first
    draws progress."""
    reporter = Reporter(interactive=True, silent=True)
    assert reporter.progress is None and Reporter(interactive=True).progress is not None
    task = reporter.start_task("training", total=10)
    task.update(completed=5)
    task.stop("done")
    reporter.warn("nobody hears this")
    reporter.close()
    assert capsys.readouterr().err == ""


def test_a_stage_stopped_early_says_where_not_done(capsys):
    task = Reporter(interactive=False).start_task("training", total=100, completed=40)
    task.update(completed=45)
    task.stop("interrupted")
    assert re.fullmatch(
        rf"training interrupted at 45/100 steps after {DURATION}", capsys.readouterr().err.strip()
    )


def test_bytes_are_counted_in_readable_units():
    assert progress.format_bytes(512) == "512 B"
    assert progress.format_bytes(41_100) == "41.1 kB"
    assert progress.format_bytes(4_200_000) == "4.2 MB"
    assert progress.plural(1, "step") == "1 step" and progress.plural(2, "step") == "2 steps"


def test_piped_eval_prints_one_summary_line_and_no_dangling_separator(trained_base, tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_corpus(200, seed=3))
    result = run_noodle(
        "eval", trained_base, corpus, "--backend", "cpu", env={"OMP_NUM_THREADS": "1"}
    )

    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("tokenizing")] == [
        next(line for line in lines if line.startswith("tokenizing done: "))
    ]
    assert re.fullmatch(rf"evaluating done: \d+ batches? in {DURATION}", lines[-1])
    assert not any(line.rstrip().endswith("|") for line in lines)


@dataclass
class TerminalRun:
    exit_code: int
    screen: list[str]  # every line the terminal was shown, escape sequences removed
    out: Path
    args: list[str]


def run_in_terminal(args: list[str], env: dict, interrupt_on: str, columns: int = 80) -> tuple:
    """Run the CLI with a terminal of `columns` columns as its stdin, stdout and stderr;
    send SIGINT once the output shows `interrupt_on`. Returns (exit code, output)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    environment = {k: v for k, v in noodle_env(env).items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        noodle_command(tuple(args)),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**environment, "TERM": "xterm-256color"},
    )
    os.close(terminal)
    output, interrupted, deadline = b"", False, time.monotonic() + 240
    while time.monotonic() < deadline:
        if select.select([controller], [], [], 0.1)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal is gone with the process
                chunk = b""
            if not chunk:
                break
            output += chunk
            shown = ANSI_ESCAPE.sub("", output.decode(errors="replace"))
            if not interrupted and interrupt_on in shown:
                process.send_signal(signal.SIGINT)
                interrupted = True
        elif process.poll() is not None:
            break
    os.close(controller)
    if process.poll() is None:
        process.kill()
    return process.wait(), output.decode(errors="replace")


@pytest.fixture(scope="module")
def interrupted_in_a_terminal(tiny_run: TinyRun, tmp_path_factory) -> TerminalRun:
    """A run in an 80-column terminal, given Ctrl-C as soon as its bar shows a loss (from
    step 1): before its first evaluation (an epoch of this corpus is ~11 steps, more than
    the whole run), and during a step long enough (batches of 256) for the bar to
    acknowledge it before it ends."""
    root = tmp_path_factory.mktemp("terminal")
    corpus = root / "stories.txt"
    corpus.write_text(story_corpus(12_000))
    out = root / "model"
    args = [
        *TinyRun(corpus, tiny_run.config, tiny_run.tokenizer, tiny_run.env).train_args(out),
        *("--max-steps", str(TERMINAL_STEPS), "--batch-size", "256"),
        *("--eval-interval", "1000"),
        *("--eval-batches", "2"),
    ]
    exit_code, output = run_in_terminal(args, tiny_run.env, interrupt_on="loss ")
    screen = [line for line in re.split(r"[\r\n]+", ANSI_ESCAPE.sub("", output)) if line.strip()]
    return TerminalRun(exit_code, screen, out, args)


def test_the_bar_fits_80_columns_with_count_time_and_loss(interrupted_in_a_terminal):
    bars = [line for line in interrupted_in_a_terminal.screen if "━" in line]
    assert bars and all(len(line) <= 80 for line in bars), bars
    progressing = rf"training [━╸╺ ]+ \d+/{TERMINAL_STEPS} steps {DURATION}<({DURATION}|\?)"
    stopping = rf"training [━╸╺ ]+ \d+/{TERMINAL_STEPS} steps Ctrl-C: stopping after this step$"
    training = [line for line in bars if line.startswith("training")]
    assert all(re.match(progressing, line) or re.match(stopping, line) for line in training)
    assert any(re.match(rf"{progressing} loss \d+\.\d+", line) for line in training), bars
    assert not any("eta" in line for line in interrupted_in_a_terminal.screen)


def test_ctrl_c_is_acknowledged_at_once_and_the_stage_ends_interrupted(interrupted_in_a_terminal):
    run = interrupted_in_a_terminal
    assert run.exit_code == 130
    assert any("Ctrl-C: stopping after this step" in line for line in run.screen), run.screen
    assert any(
        re.match(rf"training interrupted at \d+/{TERMINAL_STEPS} steps after {DURATION}", line)
        for line in run.screen
    )
    assert not any(line.startswith("training done") for line in run.screen)
    assert run.screen[-1].startswith("error: interrupted by SIGINT at step ")


def test_an_interrupt_before_the_first_evaluation_keeps_the_weights(
    interrupted_in_a_terminal, cli_in_process, tiny_run
):
    run = interrupted_in_a_terminal
    summary = json.loads((run.out / "model.json").read_text())["training"]
    assert summary["status"] == "interrupted" and summary["best_val_loss"] is None
    assert summary["weights"] == "unevaluated"
    assert summary["weights_step"] == summary["steps"] > 0
    steps = summary["steps"]

    code, out, err = cli_in_process("info", run.out)
    assert code == 0, err
    out = " ".join(out.replace("│", " ").split())  # the table's rows, unwrapped
    assert f"status interrupted at step {steps} " in out
    assert f"the weights of step {steps}, saved when the run stopped before any" in " ".join(
        out.split()
    )

    warning = (
        f"warning: {run.out}: the run is not finished, it is interrupted at step {steps}; these "
        f"are the weights of step {steps}, saved when the run stopped before any evaluation"
    )
    code, out, err = cli_in_process(
        "chat", run.out, "--prompt", "once upon", "--backend", "cpu", "--max-tokens", 4
    )
    assert code == 0, err
    assert warning in err and out.strip()
    code, out, err = cli_in_process("eval", run.out, tiny_run.corpus, "--backend", "cpu", "--json")
    assert code == 0, err
    assert warning in err and json.loads(out)["tokens"] > 0


def test_the_interrupted_run_resumes_with_no_evaluation_yet(
    interrupted_in_a_terminal, cli_in_process, one_torch_thread
):
    run = interrupted_in_a_terminal
    steps = json.loads((run.out / "model.json").read_text())["training"]["steps"]
    code, _, err = cli_in_process(*run.args, "--resume")
    assert code == 0, err
    assert f"resuming at step {steps} (epoch 1, no evaluation yet)" in err
    assert "inf" not in err
    assert json.loads((run.out / "model.json").read_text())["training"]["weights"] == "best"


def test_a_directory_whose_run_saved_no_weights_yet_says_so(tmp_path, tiny_run, cli_in_process):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.json").write_text(
        json.dumps({"n_layers": 2, "training": {"status": "training", "steps": 0, "best_step": 0}})
    )
    code, _, err = cli_in_process("info", out)
    assert code == 1
    assert err.strip().endswith(
        "model.safetensors is missing from "
        f"{out} (its run is still training, or was killed; it writes its first weights at its "
        "first evaluation)"
    )

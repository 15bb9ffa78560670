"""SIGINT and SIGTERM during `noodle train`: resume state saved, exit 128 + signal, and a
resumed run that ends with exactly the weights of an uninterrupted one; SIGINT during
`noodle finetune`, which runs the same training loop, and its resumption."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from noodle.cli import sigterm_raises_interrupted
from noodle.errors import Interrupted
from noodle.train.loop import SignalCatcher
from tests.conftest import ONE_THREAD, PAIRS, run_noodle, start_noodle, write_instructions
from tests.tiny_runs import TinyRun, read_metrics, saved_tensors

STEPS = 100
INTERRUPT_AFTER_STEP = 60
OPTIONS = (
    *("--max-steps", STEPS, "--batch-size", 8, "--lr", 3e-3),
    *("--eval-interval", 25, "--eval-batches", 4, "--patience", 100, "--seed", 7),
)
SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}
FINETUNE_EPOCHS = 25
# PAIRS * 4 leaves 18 training examples: 4 batches of 4 an epoch.
FINETUNE_STEPS = FINETUNE_EPOCHS * 4
FINETUNE_INTERRUPT_AFTER_STEP = 30


@dataclass
class InterruptedRun:
    out: Path
    exit_code: int
    message: str  # the last line on stderr
    summary: dict  # model.json's training summary right after the interruption
    resume_command: list[str]  # the command the message says continues the run
    resumed_exit_code: int | None = None  # that command's
    resumed_stderr: str = ""


def finish(process: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()


def interrupt_at_step(runs: dict[int, tuple[subprocess.Popen, Path]], step: int) -> None:
    """Send each run its signal as soon as its metrics.jsonl shows `step`."""
    pending, deadline = dict(runs), time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for signum, (process, out) in list(pending.items()):
            if process.poll() is not None:  # ended early: its exit code tells the test
                del pending[signum]
            elif any(record["step"] >= step for record in read_metrics(out)):
                process.send_signal(signum)
                del pending[signum]
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tiny_run: TinyRun, tmp_path_factory) -> tuple[Path, dict[int, InterruptedRun]]:
    """An uninterrupted run, and per signal a run interrupted past step 60 then resumed with
    the command its message gives. Each process uses one thread, so they run side by side."""
    root = tmp_path_factory.mktemp("interrupts")
    reference = root / "uninterrupted"
    uninterrupted = start_noodle(
        *tiny_run.train_args(reference, *OPTIONS),
        stderr=root / "uninterrupted.log",
        env=tiny_run.env,
    )
    started = {
        signum: start_noodle(
            *tiny_run.train_args(root / signum.name, *OPTIONS),
            stderr=root / f"{signum.name}.log",
            env=tiny_run.env,
        )
        for signum in SIGNALS
    }
    interrupt_at_step(
        {signum: (process, root / signum.name) for signum, process in started.items()},
        INTERRUPT_AFTER_STEP,
    )
    interrupted, resuming = {}, {}
    for signum, process in started.items():
        out, log = root / signum.name, root / f"{signum.name}.log"
        exit_code = finish(process)
        message = log.read_text().splitlines()[-1]
        command = shlex.split(message.partition("Continue with: ")[2])
        summary = json.loads((out / "model.json").read_text())["training"]
        interrupted[signum] = InterruptedRun(out, exit_code, message, summary, command)
        resuming[signum] = start_noodle(*command[1:], stderr=log, env=tiny_run.env)
    for signum, process in resuming.items():
        interrupted[signum].resumed_exit_code = finish(process)
        interrupted[signum].resumed_stderr = (root / f"{signum.name}.log").read_text()
    assert finish(uninterrupted) == 0, (root / "uninterrupted.log").read_text()
    return reference, interrupted


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_interrupted_run_resumes_to_the_uninterrupted_weights(signum, runs, tiny_run):
    reference, interrupted = runs
    run = interrupted[signum]
    assert run.exit_code == SIGNALS[signum]
    assert run.message.startswith(f"error: interrupted by {signum.name} at step "), run.message
    assert run.summary["status"] == "interrupted"
    assert INTERRUPT_AFTER_STEP <= run.summary["steps"] < STEPS

    # The message gives the exact command to continue, which the fixture ran.
    assert run.resume_command == ["noodle", *tiny_run.train_args(run.out, *OPTIONS), "--resume"]
    assert run.resumed_exit_code == 0, run.resumed_stderr
    assert f"resuming at step {run.summary['steps']} " in run.resumed_stderr

    # Final weights, optimizer moments and RNG (the last resume state) and the best weights
    # are bit-identical to the uninterrupted run's.
    for name in ("resume.safetensors", "model.safetensors"):
        expected, actual = saved_tensors(reference / name), saved_tensors(run.out / name)
        assert expected.keys() == actual.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensor, actual[key]), f"{name}: {key} differs"
    evals = [
        [(m["step"], m["val_loss"]) for m in read_metrics(out) if m["kind"] == "eval"]
        for out in (reference, run.out)
    ]
    assert evals[0] == evals[1]
    train_steps = [m["step"] for m in read_metrics(run.out) if m["kind"] == "train"]
    assert train_steps == sorted(set(train_steps))
    summaries = [
        json.loads((out / "model.json").read_text())["training"] for out in (reference, run.out)
    ]
    for key in ("status", "steps", "tokens_seen", "best_val_loss", "best_step"):
        assert summaries[0][key] == summaries[1][key], key


def test_a_run_killed_before_its_first_evaluation_resumes_to_the_uninterrupted_weights(
    runs, tiny_run, tmp_path
):
    """kill -9 (no chance to save anything) after the first logged steps, before the first
    evaluation: the resume state saved before step 1 lets the run start again exactly."""
    reference, _ = runs
    out = tmp_path / "killed"
    args = tiny_run.train_args(out, *OPTIONS)
    process = start_noodle(*args, stderr=tmp_path / "killed.log", env=tiny_run.env)
    try:
        deadline = time.monotonic() + 120
        while not read_metrics(out) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
    assert json.loads((out / "model.json").read_text())["training"]["status"] == "training"

    resumed = run_noodle(*args, "--resume", env=tiny_run.env)

    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 0 " in resumed.stderr
    for name in ("resume.safetensors", "model.safetensors"):
        expected, actual = saved_tensors(reference / name), saved_tensors(out / name)
        assert expected.keys() == actual.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensor, actual[key]), f"{name}: {key} differs"


def test_first_signal_is_a_flag_and_a_second_interrupts_at_once():
    with SignalCatcher() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
    assert second.value.exit_code == 130 and second.value.resume_step is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_outside_training_is_an_exception_so_cleanup_runs():
    previous = signal.getsignal(signal.SIGTERM)
    cleaned_up = False
    with pytest.raises(Interrupted) as stopped, sigterm_raises_interrupted():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            cleaned_up = True
    assert cleaned_up and stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


def test_interrupted_finetune_saves_its_state_and_its_resume_command_finishes(
    trained_base, tmp_path
):
    out, log = tmp_path / "tuned", tmp_path / "finetune.log"
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS * 4)
    options = ("--backend", "cpu", "--max-epochs", FINETUNE_EPOCHS)
    args = [*map(str, ("finetune", trained_base, instructions, out, *options))]
    process = start_noodle(*args, stderr=log, env=ONE_THREAD)
    interrupt_at_step({signal.SIGINT: (process, out)}, FINETUNE_INTERRUPT_AFTER_STEP)

    assert finish(process) == 130, log.read_text()
    message = log.read_text().splitlines()[-1]
    assert message.startswith("error: interrupted by SIGINT at step "), message
    summary = json.loads((out / "model.json").read_text())["training"]
    assert summary["kind"] == "finetune" and summary["status"] == "interrupted"
    assert FINETUNE_INTERRUPT_AFTER_STEP <= summary["steps"] < FINETUNE_STEPS
    assert (out / "resume.safetensors").is_file()

    command = shlex.split(message.partition("Continue with: ")[2])
    assert command == ["noodle", *args, "--resume"]
    resumed = run_noodle(*command[1:], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {summary['steps']} " in resumed.stderr
    summary = json.loads((out / "model.json").read_text())["training"]
    assert summary["status"] == "finished" and summary["steps"] == FINETUNE_STEPS


def test_interrupted_lora_finetune_resumes_to_the_uninterrupted_adapters_and_weights(
    trained_base, tmp_path
):
    """A LoRA run's resume state holds its adapters alone; the frozen base comes back from
    the base model's directory, and the resumed run ends bit-identical to one never
    interrupted: adapters, merged weights and resume state."""
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS * 4)
    options = ("--backend", "cpu", "--max-epochs", FINETUNE_EPOCHS, "--lora-rank", 4)
    options += ("--lr", 1e-2, "--patience", 100)

    def args(out: Path) -> list[str]:
        return [*map(str, ("finetune", trained_base, instructions, out, *options))]

    reference, out = tmp_path / "uninterrupted", tmp_path / "tuned"
    uninterrupted = start_noodle(*args(reference), stderr=tmp_path / "ref.log", env=ONE_THREAD)
    process = start_noodle(*args(out), stderr=tmp_path / "run.log", env=ONE_THREAD)
    interrupt_at_step({signal.SIGINT: (process, out)}, FINETUNE_INTERRUPT_AFTER_STEP)
    assert finish(process) == 130, (tmp_path / "run.log").read_text()
    steps = json.loads((out / "model.json").read_text())["training"]["steps"]
    assert FINETUNE_INTERRUPT_AFTER_STEP <= steps < FINETUNE_STEPS

    resumed = run_noodle(*args(out), "--resume", env=ONE_THREAD)

    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {steps} " in resumed.stderr
    assert finish(uninterrupted) == 0, (tmp_path / "ref.log").read_text()
    for name in ("adapters.safetensors", "model.safetensors", "resume.safetensors"):
        expected, actual = saved_tensors(reference / name), saved_tensors(out / name)
        assert expected.keys() == actual.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensor, actual[key]), f"{name}: {key} differs"

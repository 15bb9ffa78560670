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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from noodle.cli import sigterm_raises_interrupted
from noodle.errors import Interrupted
from noodle.train.loop import SignalCatcher
from tests.conftest import PAIRS, run_cli_on_one_thread, start_noodle, write_instructions
from tests.tiny_runs import TinyRun, assert_same_files, read_metrics

STEPS = 40
INTERRUPT_AFTER_STEP = 20
OPTIONS = (
    *("--max-steps", STEPS, "--batch-size", 8, "--lr", 3e-3),
    *("--eval-interval", 10, "--eval-batches", 4, "--patience", 100, "--seed", 7),
)
SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}
FINETUNE_EPOCHS = 10
# PAIRS * 4 leaves 18 training examples: 4 batches of 4 an epoch.
FINETUNE_STEPS = FINETUNE_EPOCHS * 4
FINETUNE_INTERRUPT_AFTER_STEP = 16
FINETUNE_OPTIONS = ("--backend", "cpu", "--max-epochs", FINETUNE_EPOCHS)
LORA_OPTIONS = (*FINETUNE_OPTIONS, "--lora-rank", 4, "--lr", 1e-2, "--patience", 100)


@dataclass
class FixtureRun:
    """A run of the `runs` fixture, as it ended or stopped (before any test resumes it)."""

    out: Path
    args: list[str]  # the command, after `noodle`
    exit_code: int
    stderr: str
    summary: dict  # model.json's training summary

    @property
    def message(self) -> str:
        return self.stderr.splitlines()[-1]

    @property
    def resume_command(self) -> list[str]:
        """The command the message says continues the run."""
        return shlex.split(self.message.partition("Continue with: ")[2])


def finish(process: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()


def stop_at_steps(stops: dict[Path, tuple[subprocess.Popen, int, int]]) -> None:
    """For each output directory, send its process the signal as soon as its metrics.jsonl
    shows the step: `{out: (process, signal, step)}`."""
    pending, deadline = dict(stops), time.monotonic() + 240
    while pending and time.monotonic() < deadline:
        for out, (process, signum, step) in list(pending.items()):
            if process.poll() is not None:  # ended early: its exit code tells the test
                del pending[out]
            elif any(record["step"] >= step for record in read_metrics(out)):
                process.send_signal(signum)
                del pending[out]
        time.sleep(0.01)


@pytest.fixture(scope="module")
def runs(tiny_run: TinyRun, trained_base: Path, tmp_path_factory) -> dict[str, FixtureRun]:
    """Side by side, each process on one thread: training runs, one per signal stopped past
    step 20 and one killed (SIGKILL, no chance to save anything) once it logged its first
    step, before its first evaluation; a fine-tuning and a LoRA fine-tuning stopped by
    SIGINT past step 16. Meanwhile this process trains the same runs uninterrupted. Each
    test resumes its own run in-process."""
    root = tmp_path_factory.mktemp("interrupts")
    instructions = write_instructions(root / "qa.txt", PAIRS * 4)

    def finetune(name: str, options: tuple) -> list[str]:
        return [*map(str, ("finetune", trained_base, instructions, root / name, *options))]

    # name: (the command after `noodle`, the signal that stops it and past which step)
    interrupted = {
        **{
            signum.name: (
                tiny_run.train_args(root / signum.name, *OPTIONS),
                (signum, INTERRUPT_AFTER_STEP),
            )
            for signum in SIGNALS
        },
        "killed": (tiny_run.train_args(root / "killed", *OPTIONS), (signal.SIGKILL, 1)),
        "finetune": (
            finetune("finetune", FINETUNE_OPTIONS),
            (signal.SIGINT, FINETUNE_INTERRUPT_AFTER_STEP),
        ),
        "lora": (finetune("lora", LORA_OPTIONS), (signal.SIGINT, FINETUNE_INTERRUPT_AFTER_STEP)),
    }
    uninterrupted = {
        "uninterrupted": tiny_run.train_args(root / "uninterrupted", *OPTIONS),
        "lora-uninterrupted": finetune("lora-uninterrupted", LORA_OPTIONS),
    }
    started = {
        name: start_noodle(*args, stderr=root / f"{name}.log", env=tiny_run.env)
        for name, (args, _) in interrupted.items()
    }
    stops = {root / name: (started[name], *stop) for name, (_, stop) in interrupted.items()}
    with ThreadPoolExecutor(max_workers=1) as stopper:  # it signals, this thread trains
        stopping = stopper.submit(stop_at_steps, stops)
        ended = {}
        for name, args in uninterrupted.items():
            code, _, stderr = run_cli_on_one_thread(*args)
            ended[name] = (args, code, stderr)
        stopping.result()
    for name, (args, _) in interrupted.items():
        ended[name] = (args, finish(started[name]), (root / f"{name}.log").read_text())
    return {
        name: FixtureRun(
            root / name,
            args,
            exit_code,
            stderr,
            json.loads((root / name / "model.json").read_text())["training"],
        )
        for name, (args, exit_code, stderr) in ended.items()
    }


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_interrupted_run_resumes_to_the_uninterrupted_weights(
    signum, runs, tiny_run, cli_in_process, one_torch_thread
):
    reference, run = runs["uninterrupted"], runs[signum.name]
    assert reference.exit_code == 0, reference.stderr
    assert run.exit_code == SIGNALS[signum], run.stderr
    assert run.message.startswith(f"error: interrupted by {signum.name} at step "), run.message
    assert run.summary["status"] == "interrupted"
    assert INTERRUPT_AFTER_STEP <= run.summary["steps"] < STEPS

    # The message gives the exact command to continue.
    assert run.resume_command == ["noodle", *tiny_run.train_args(run.out, *OPTIONS), "--resume"]
    code, _, err = cli_in_process(*run.resume_command[1:])
    assert code == 0, err
    assert f"resuming at step {run.summary['steps']} " in err

    # Final weights, optimizer moments and RNG (the last resume state) and the best weights
    # are bit-identical to the uninterrupted run's.
    assert_same_files(reference.out, run.out, ("resume.safetensors", "model.safetensors"))
    evals = [
        [(m["step"], m["val_loss"]) for m in read_metrics(out) if m["kind"] == "eval"]
        for out in (reference.out, run.out)
    ]
    assert evals[0] == evals[1]
    train_steps = [m["step"] for m in read_metrics(run.out) if m["kind"] == "train"]
    assert train_steps == sorted(set(train_steps))
    summaries = [
        json.loads((out / "model.json").read_text())["training"] for out in (reference.out, run.out)
    ]
    for key in ("status", "steps", "tokens_seen", "best_val_loss", "best_step"):
        assert summaries[0][key] == summaries[1][key], key


def test_a_run_killed_before_its_first_evaluation_resumes_to_the_uninterrupted_weights(
    runs, cli_in_process, one_torch_thread
):
    """kill -9 (no chance to save anything) after the first logged steps, before the first
    evaluation: the resume state saved before step 1 lets the run start again exactly."""
    reference, run = runs["uninterrupted"], runs["killed"]
    assert reference.exit_code == 0, reference.stderr
    assert run.exit_code == -signal.SIGKILL, run.stderr
    assert run.summary["status"] == "training"

    code, _, err = cli_in_process(*run.args, "--resume")

    assert code == 0, err
    assert "resuming at step 0 " in err
    assert_same_files(reference.out, run.out, ("resume.safetensors", "model.safetensors"))


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
    runs, cli_in_process, one_torch_thread
):
    run = runs["finetune"]
    assert run.exit_code == 130, run.stderr
    assert run.message.startswith("error: interrupted by SIGINT at step "), run.message
    assert run.summary["kind"] == "finetune" and run.summary["status"] == "interrupted"
    assert FINETUNE_INTERRUPT_AFTER_STEP <= run.summary["steps"] < FINETUNE_STEPS
    assert (run.out / "resume.safetensors").is_file()

    assert run.resume_command == ["noodle", *run.args, "--resume"]
    code, _, err = cli_in_process(*run.resume_command[1:])
    assert code == 0, err
    assert f"resuming at step {run.summary['steps']} " in err
    summary = json.loads((run.out / "model.json").read_text())["training"]
    assert summary["status"] == "finished" and summary["steps"] == FINETUNE_STEPS


def test_interrupted_lora_finetune_resumes_to_the_uninterrupted_adapters_and_weights(
    runs, cli_in_process, one_torch_thread
):
    """A LoRA run's resume state holds its adapters alone; the frozen base comes back from
    the base model's directory, and the resumed run ends bit-identical to one never
    interrupted: adapters, merged weights and resume state."""
    reference, run = runs["lora-uninterrupted"], runs["lora"]
    assert run.exit_code == 130, run.stderr
    steps = run.summary["steps"]
    assert FINETUNE_INTERRUPT_AFTER_STEP <= steps < FINETUNE_STEPS

    code, _, err = cli_in_process(*run.args, "--resume")

    assert code == 0, err
    assert f"resuming at step {steps} " in err
    assert reference.exit_code == 0, reference.stderr
    names = ("adapters.safetensors", "model.safetensors", "resume.safetensors")
    assert_same_files(reference.out, run.out, names)

"""What the command line says to a newcomer: help that names arguments as the usage does,
usage errors with the usage line, Ctrl-C reported wherever it lands, counts in plain
words, the harusame preset's own defaults, the resume state's cost, and CPU threads."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
import torch

from noodle.device import describe_device, free_core_threads, select_device
from noodle.train.settings import TrainState
from tests.conftest import ONE_THREAD, noodle_command, noodle_env, story_corpus
from tests.tiny_runs import TinyRun

USAGES = {
    "train": "noodle train [OPTIONS] CORPUS OUTPUT_DIR",
    "finetune": "noodle finetune [OPTIONS] MODEL INPUT OUTPUT_DIR",
    "prepare-instructions": "noodle prepare-instructions [OPTIONS] IN OUT",
    "eval": "noodle eval [OPTIONS] MODEL CORPUS",
    "info": "noodle info [OPTIONS] MODEL",
    "chat": "noodle chat [OPTIONS] MODEL",
}


@pytest.mark.parametrize("command", USAGES)
def test_help_names_arguments_and_shows_no_bool_type(command, cli_in_process):
    code, out, _ = cli_in_process(command, "--help")
    assert code == 0
    assert f"Usage: {USAGES[command]}" in out
    assert "{" not in out.partition("Usage:")[2].splitlines()[0]
    assert "<bool>" not in out


def test_noodle_alone_prints_the_help_and_succeeds(cli_in_process):
    code, out, err = cli_in_process()
    assert code == 0 and err == ""
    assert "Usage: noodle [OPTIONS] COMMAND [ARGS]..." in out
    assert all(command in out for command in USAGES)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["train", "corpus.txt"], "Missing argument 'OUTPUT_DIR'. See 'noodle train --help'."),
        (
            ["eval", "model", "corpus.txt", "--bogus"],
            "No such option: --bogus. See 'noodle eval --help'.",
        ),
    ],
)
def test_a_wrong_command_line_shows_the_usage_line_then_one_error(args, error, cli_in_process):
    code, out, err = cli_in_process(*args)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"Usage: {USAGES[args[0]]}", f"error: {error}"]


def test_ctrl_c_during_eval_is_reported_not_silent(trained_base):
    """The corpus comes through a pipe left open: once most of it has been read, eval is
    tokenizing, waiting for the rest, when Ctrl-C comes."""
    process = subprocess.Popen(
        noodle_command(("eval", trained_base, "-", "--backend", "cpu")),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=noodle_env(ONE_THREAD),
    )
    try:
        # Returns once all but a pipe's buffer (64 KiB) of it has been read.
        process.stdin.write(story_corpus(3000).encode())
        process.stdin.flush()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
        process.stdin.close()
    assert process.stderr.read().decode().splitlines()[-1] == "error: interrupted by SIGINT"
    assert process.stdout.read() == b""


def test_counts_and_losses_read_as_words():
    assert TrainState().best_description() == "no evaluation yet"
    state = TrainState(best_loss=1.23456, best_step=1200)
    assert state.best_description() == "best validation loss 1.2346 at step 1,200"


def test_a_one_step_run_says_one_step_and_can_drop_its_resume_state(
    tiny_run: TinyRun, tmp_path, cli_in_process, one_torch_thread
):
    out = tmp_path / "model"
    code, _, err = cli_in_process(*tiny_run.train_args(out, "--max-steps", 1, "--eval-batches", 1))
    assert code == 0, err
    assert re.search(
        r"^done: 1 step, 512 tokens, best validation loss \d+\.\d{4} at step 1 ", err, re.M
    )
    sizes = re.search(
        r"holds ([\d,.]+) MB, ([\d,.]+) MB of it the resume state \(resume\.safetensors\)", err
    )
    assert sizes and "delete it to keep the model alone (or train with --drop-resume-state)" in err
    assert (out / "resume.safetensors").is_file()

    dropped = tmp_path / "dropped"
    code, _, err = cli_in_process(
        *tiny_run.train_args(dropped, "--max-steps", 1, "--eval-batches", 1, "--drop-resume-state")
    )
    assert code == 0, err
    assert re.search(
        r"^dropped the resume state \([\d,.]+ MB\): the run cannot be extended$", err, re.M
    )
    assert not (dropped / "resume.safetensors").exists()
    assert (dropped / "model.safetensors").is_file()


def test_harusame_brings_its_own_defaults_and_given_options_win(
    tmp_path, cli_in_process, one_torch_thread
):
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_corpus(300))
    out = tmp_path / "model"
    args = ["train", corpus, out, "--model", "harusame", "--backend", "cpu"]
    code, _, err = cli_in_process(*args, "--max-steps", 2, "--batch-size", 4, "--eval-batches", 1)
    assert code == 0, err

    metadata = json.loads((out / "model.json").read_text())
    assert metadata["preset"] == "harusame" and metadata["emb_dim"] == 128
    training = metadata["training"]
    # Given: steps and batch size; the preset's own: its learning rate rule (2e-3 at 16).
    assert training["steps"] == 2 and training["batch_size"] == 4
    assert training["lr"] == pytest.approx(5e-4)
    # Its tokenizer was learned from the corpus: a few hundred tokens, not 50,277.
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) < 4096 == metadata["vocab_size"]
    assert "learning the tokenizer done: " in err


def test_threads_are_the_cores_other_work_leaves_free():
    assert free_core_threads(load=0.1, cpus=2, default=2) == 2
    assert free_core_threads(load=1.0, cpus=2, default=2) == 1
    assert free_core_threads(load=5.5, cpus=2, default=2) == 1
    assert free_core_threads(load=2.0, cpus=16, default=8) == 8


def test_omp_num_threads_decides_when_set(monkeypatch):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        select_device("cpu")
        assert torch.get_num_threads() == 2
        assert describe_device(torch.device("cpu")) == "cpu (2 threads)"
    finally:
        torch.set_num_threads(previous)

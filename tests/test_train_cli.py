"""End-to-end: the real CLI trains a tiny model on a generated corpus."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from noodle.checkpoint import load_model
from noodle.config import padded_vocab_size
from noodle.tokenizer import load_tokenizer
from tests.conftest import ONE_THREAD, noodle_env, run_noodle
from tests.stories import story_corpus
from tests.tiny_runs import read_metrics

# With the tiny tokenizer every story line is 18 tokens: 650 lines make 20 training batches
# of 8 x 64 and a validation split.
EPOCH_LINES = 650


def test_train_end_to_end(tmp_path, tiny_config, tiny_tokenizer):
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_corpus(EPOCH_LINES))
    out = tmp_path / "model"
    result = run_noodle(
        *("train", corpus, out, "--model", tiny_config, "--tokenizer", tiny_tokenizer),
        *("--backend", "cpu", "--max-steps", 100, "--batch-size", 8, "--lr", 3e-3),
        *("--eval-interval", 50, "--eval-batches", 4),
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    for name in ("model.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
        assert (out / name).is_file(), name

    metrics = read_metrics(out)
    evals = [m for m in metrics if m["kind"] == "eval"]
    steps = [m for m in metrics if m["kind"] == "train"]
    # Every --eval-interval steps, and at each epoch end (the corpus is 20 batches long).
    assert {20, 40, 50, 100} <= {e["step"] for e in evals}
    assert evals[-1]["step"] == 100
    assert all(m["tokens_per_second"] > 0 for m in steps)
    # An untrained model's loss is about ln(vocabulary); the corpus is easy to learn.
    vocabulary = load_tokenizer(tiny_tokenizer).vocab_size
    assert steps[0]["loss"] > 0.75 * math.log(vocabulary)
    assert evals[-1]["val_loss"] < 2.0 < math.log(vocabulary)

    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["status"] == "finished"
    assert meta["training"]["steps"] == 100
    assert meta["training"]["epochs"] == 5.0  # five whole passes of 20 batches
    assert meta["training"]["best_val_loss"] == min(e["val_loss"] for e in evals)
    loaded = load_model(out)
    assert loaded.config.n_layers == 2
    assert loaded.config.vocab_size == padded_vocab_size(vocabulary)
    # The saved weights are the best ones: their validation loss is what was logged.
    assert loaded.model.parameter_count() == meta["parameters"]
    assert torch.isfinite(next(loaded.model.parameters())).all()

    # stdout holds only the closing sample; logs went to stderr.
    assert result.stdout.startswith("Once upon a time")
    assert "val loss" in result.stderr and "tok_s" in result.stderr

    # Through a pipe: a line per stage, each stage ending with its summary and elapsed time,
    # and the run's own summary; no field left empty.
    lines = result.stderr.splitlines()
    duration = r"\d+:\d\d:\d\d"
    assert re.fullmatch(
        rf"tokenizing done: [\d.]+ kB \([\d.]+ [kM]?B/s\) in {duration} \| tokens [\d,]+", lines[0]
    )
    assert not any(line.startswith("tokenizing") for line in lines[1:])
    assert any(
        re.match(rf"training done: 100 steps in {duration} \| loss \d", line) for line in lines
    )
    assert re.search(
        r"^done: 100 steps, 51,200 tokens, best validation loss \d\.\d{4} at step \d+ -> ",
        result.stderr,
        re.M,
    )
    assert not any(line.rstrip().endswith("|") or "eta" in line for line in lines)


def test_without_a_tokenizer_train_uses_the_bundled_vocabulary(
    tmp_path, tiny_config, corpus_file, tokenizer, cli_in_process, one_torch_thread
):
    out = tmp_path / "model"
    code, _, err = cli_in_process(
        *("train", corpus_file, out, "--model", tiny_config, "--backend", "cpu"),
        *("--max-steps", 1, "--batch-size", 2, "--eval-batches", 1),
    )
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == tokenizer.raw
    assert load_model(out).config.vocab_size == 50304
    # An untrained model's loss is about ln(50304) = 10.8.
    assert read_metrics(out)[0]["loss"] > 8.0


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from noodle.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=noodle_env()
    )
    assert result.stdout  # the help or the version was printed
    assert result.stderr.strip().splitlines()[-1] == "False"


def test_an_evaluation_reads_the_same_number_of_sequences_at_any_batch_size():
    from noodle.cli import training_settings
    from noodle.train.settings import FINETUNE_DEFAULTS, PRETRAIN_DEFAULTS

    def settings(defaults, batch_size: int, eval_batches: int | None = None):
        values = {"batch_size": batch_size, "eval_batches": eval_batches, "lr": None}
        values |= {"max_epochs": 1, "max_steps": None, "eval_interval": 10, "patience": 1}
        values |= {"optimizer": "adamw", "schedule": "cosine", "seed": 1, "tensorboard_dir": None}
        values |= {"drop_resume_state": False}
        return training_settings(defaults, {**values, "min_improvement": 0, "save_every": 1})

    assert settings(PRETRAIN_DEFAULTS, 8).eval_batches == 50  # the original's default
    assert settings(PRETRAIN_DEFAULTS, 64).eval_batches == 7  # 400 sequences, rounded up
    assert settings(FINETUNE_DEFAULTS, 4).eval_batches == 500
    assert settings(PRETRAIN_DEFAULTS, 64, eval_batches=3).eval_batches == 3
    assert settings(PRETRAIN_DEFAULTS, 64).lr == PRETRAIN_DEFAULTS.lr_at_batch_4 * 16

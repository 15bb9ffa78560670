"""Fast, real training runs for the resume, interrupt, NaN-guard and bad-input tests.

The tiny tokenizer (conftest.tiny_tokenizer) keeps a step of the tiny model to milliseconds,
so a test can afford several runs of a few hundred steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from noodle.batching import split_windows
from noodle.checkpoint import ModelDir
from noodle.config import resolve_model_config
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.tokenizer import load_tokenizer
from noodle.train.loop import Trainer
from noodle.train.resume import run_identity
from noodle.train.settings import TrainSettings


@dataclass(frozen=True)
class TinyRun:
    """The inputs of a tiny training run, and how to run `noodle train` on them."""

    corpus: Path
    config: Path
    tokenizer: Path
    # For subprocesses: the test token cache, and one thread (a tiny model gains nothing
    # from more, and thread contention on a busy machine makes its steps 10x slower).
    env: dict[str, str]

    def train_args(self, out: Path, *options: str | int | float) -> list[str]:
        """`noodle train` on this corpus, model and tokenizer into `out`, on the CPU."""
        return [
            *("train", str(self.corpus), str(out)),
            *("--model", str(self.config), "--tokenizer", str(self.tokenizer)),
            *("--backend", "cpu"),
            *map(str, options),
        ]

    def trainer(self, out: Path, settings: TrainSettings) -> Trainer:
        """A Trainer on a real model and the real corpus, for in-process tests."""
        tokenizer = load_tokenizer(self.tokenizer)
        _, config = resolve_model_config(str(self.config), tokenizer.vocab_size)
        tokens = np.asarray(tokenizer.encode(self.corpus.read_text()), dtype=np.uint16)
        train_data, eval_data = split_windows(
            tokens, config.ctx_len, settings.batch_size, settings.seed
        )
        torch.manual_seed(settings.seed)
        return Trainer(
            NoodleModel(config),
            train_data,
            eval_data,
            settings,
            ModelDir(out),
            torch.device("cpu"),
            torch.float32,
            Reporter(interactive=False, quiet=True),
            run_identity(settings, architecture=config.to_dict()),
        )


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118


def assert_same_tensors(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], what: str
) -> None:
    """`actual` holds the tensors of `expected` (`what` they are, for the message), bit for
    bit, and no others."""
    assert expected.keys() == actual.keys(), what
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), f"{what}: {name} differs"


def assert_same_files(reference: Path, out: Path, names: Iterable[str]) -> None:
    """The safetensors files `names` of `out` are bit-identical to those of `reference`."""
    for name in names:
        assert_same_tensors(saved_tensors(reference / name), saved_tensors(out / name), name)


def directory_snapshot(directory: Path) -> dict[str, bytes | None]:
    """Everything under `directory`: each file's bytes (None for a subdirectory or a file
    the test made unreadable), to show that a command changed nothing."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        if path.is_file() and os.access(path, os.R_OK)
        else None
        for path in sorted(directory.rglob("*"))
    }

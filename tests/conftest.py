"""Shared test helpers: tiny models, generated corpora and running the real CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._inductor.config

from noodle.instructions import Instruction, format_block
from noodle.tokenizer import TextTokenizer, learn_tokenizer, load_tokenizer
from tests.stories import story_corpus
from tests.tiny_runs import TinyRun

# On a 2-core machine with an empty compile cache (CI's), inductor's pool of compile workers
# costs more than it saves: the compiling tests take a third longer with it.
torch._inductor.config.compile_threads = 1

REPO = Path(__file__).resolve().parent.parent

TINY_CONFIG = {
    "n_layers": 2,
    "emb_dim": 64,
    "n_heads": 2,
    "head_dim": 32,
    "hidden_dim": 128,
    "ctx_len": 64,
    "dropout": 0.0,
}

# Question/answer pairs a tiny model can learn in a few dozen fine-tuning steps.
PAIRS = [
    ("what color is the sky?", "the sky is blue."),
    ("what does the dog say?", "the dog says woof."),
    ("where does lily play?", "lily plays in the park."),
    ("what is tom holding?", "tom has a red ball."),
    ("who found the frog?", "mia found the frog."),
]


def write_instructions(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """An instruction file for `noodle finetune` with one example per pair."""
    path.write_text("\n".join(format_block(Instruction(q, "", a)) for q, a in pairs))
    return path


def tests_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "xdg-cache"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the token cache of every test out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tests_cache_dir(tmp_path_factory)))
    monkeypatch.delenv("NOODLE_BACKEND", raising=False)
    monkeypatch.delenv("NOODLE_DEBUG", raising=False)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to `count` for the `with`, then put back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """One thread for tiny models run in-process: they gain nothing from a second one, and
    on a busy machine thread contention makes them several times slower."""
    with torch_threads(1):
        yield


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(story_corpus(600))
    return path


def noodle_command(args: tuple[str | Path | int | float, ...]) -> list[str]:
    return [sys.executable, "-m", "noodle", *map(str, args)]


def noodle_env(env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}


def run_noodle(
    *args: str, input: str | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the real `noodle` CLI in a subprocess (as `python -m noodle`)."""
    return subprocess.run(
        noodle_command(args),
        input=input,
        capture_output=True,
        text=True,
        env=noodle_env(env),
        timeout=timeout,
        check=False,
    )


# One intra-op thread: on a small, busy CI machine PyTorch's thread pool contends with
# everything else and tiny models run several times slower with it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def start_noodle(*args: str, stderr: Path, env: dict | None = None) -> subprocess.Popen:
    """Start the real `noodle` CLI without waiting; its stderr goes to the file `stderr`
    (a pipe nobody reads could fill up and stall it)."""
    with stderr.open("w") as log:
        return subprocess.Popen(
            noodle_command(args),
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=noodle_env(env),
        )


def write_small_tokenizer(path: Path, text: str, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer learned from `text` (as `--tokenizer bpe:N` learns one),
    with <|endoftext|> = 0 and <|padding|> = 1 like the bundled one. With a vocabulary this
    small a tiny model's step takes milliseconds instead of being dominated by the
    50,304-way output layer."""
    path.write_bytes(learn_tokenizer(text.splitlines(keepends=True), vocab_size).raw)
    return path


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    """The bundled GPT-NeoX-20B tokenizer."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A small BPE trained on story_corpus, for tests that train hundreds of steps."""
    path = tmp_path_factory.mktemp("tokenizer") / "tiny-tokenizer.json"
    return write_small_tokenizer(path, story_corpus(600))


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory) -> Path:
    """A tiny model trained on story_corpus through the real CLI, with a small tokenizer.
    (--no-cache: session fixtures run before `isolated_cache` redirects the cache.)"""
    work = tmp_path_factory.mktemp("base")
    corpus = work / "corpus.txt"
    corpus.write_text(story_corpus(600))
    config = work / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    tokenizer = write_small_tokenizer(work / "tokenizer.json", story_corpus(300, seed=1))
    out = work / "model"
    result = run_noodle(
        *("train", corpus, out, "--model", config, "--tokenizer", tokenizer),
        *("--backend", "cpu", "--max-steps", 40, "--batch-size", 8, "--lr", 3e-3),
        *("--eval-interval", 20, "--eval-batches", 4, "--no-cache"),
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    return out


def run_cli_here(*args: object) -> tuple[int, str, str]:
    """Run the CLI's entry point in this process (no interpreter start-up, for quick error
    checks); returns (exit code, stdout, stderr)."""
    from noodle.cli import main

    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as exit_info,
    ):
        main([str(arg) for arg in args])
    return exit_info.value.code, out.getvalue(), err.getvalue()


def run_cli_on_one_thread(*args: object) -> tuple[int, str, str]:
    """`run_cli_here` on one torch thread (see `one_torch_thread`), for the module-scoped
    fixtures that train a tiny model in this process."""
    with torch_threads(1):
        return run_cli_here(*args)


@pytest.fixture
def cli_in_process():
    """`run_cli_here`, for tests."""
    return run_cli_here


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tokenizer) -> TinyRun:
    """A story corpus, a tiny model with dropout and the tiny tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-run")
    corpus = directory / "stories.txt"
    corpus.write_text(story_corpus(600))
    config = directory / "tiny-dropout.json"
    # Dropout > 0: a resumed run can only match an uninterrupted one if the RNG is restored.
    config.write_text(json.dumps({**TINY_CONFIG, "dropout": 0.1}))
    env = {"XDG_CACHE_HOME": str(tests_cache_dir(tmp_path_factory)), "OMP_NUM_THREADS": "1"}
    return TinyRun(corpus, config, tiny_tokenizer, env)

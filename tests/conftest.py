"""Shared test helpers: tiny models, generated corpora and running the real CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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

NAMES = ["tom", "lily", "ben", "mia", "sam", "anna"]
THINGS = ["red ball", "big dog", "little cat", "blue kite", "green frog", "toy car"]
PLACES = ["park", "garden", "house", "forest", "beach", "school"]


def story_corpus(lines: int, seed: int = 0) -> str:
    """Simple, learnable text: a handful of sentence shapes over a small vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
        out.append(f"once upon a time {name} found a {thing} in the {place}. {name} was happy.")
    return "\n".join(out) + "\n"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the token cache of every test out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    monkeypatch.delenv("NOODLE_BACKEND", raising=False)
    monkeypatch.delenv("NOODLE_DEBUG", raising=False)


@pytest.fixture
def one_torch_thread():
    """One thread for tiny models run in-process: they gain nothing from a second one, and
    on a busy machine thread contention makes them several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def run_noodle(
    *args: str, input: str | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the real `noodle` CLI in a subprocess (as `python -m noodle`)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "noodle", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )

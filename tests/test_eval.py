"""`noodle eval`: loss, perplexity and bits per byte of a model on a corpus."""

from __future__ import annotations

import json
import math
import random

import numpy as np

from noodle.checkpoint import load_model
from noodle.evaluation import text_bytes, token_byte_lengths
from noodle.tokenizer import load_tokenizer
from tests.conftest import ONE_THREAD, run_noodle, story_corpus

WORDS = ["invoice", "ledger", "quarterly", "revenue", "audit", "margin", "tax", "budget"]


def unrelated_text(lines: int) -> str:
    rng = random.Random(7)
    return "".join(
        " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".\n" for _ in range(lines)
    )


def expected_windows(model_dir, text: str) -> tuple[int, int]:
    """(tokens evaluated, UTF-8 bytes of their text), computed independently of noodle eval:
    the corpus is tokenized line by line, cut into ctx_len windows, and the targets are
    tokens 1 .. windows × ctx_len."""
    loaded = load_model(model_dir)
    ids = [i for line in text.splitlines(keepends=True) for i in loaded.tokenizer.encode(line)]
    ctx_len = loaded.config.ctx_len
    evaluated = (len(ids) - 1) // ctx_len * ctx_len
    return evaluated, len(loaded.tokenizer.decode(ids[1 : evaluated + 1]).encode("utf-8"))


def test_eval_reports_loss_perplexity_and_bits_per_byte(
    trained_base, tmp_path, cli_in_process, one_torch_thread
):
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_corpus(600))  # the text the model was trained on
    result = run_noodle("eval", trained_base, corpus, "--json", "--backend", "cpu", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"loss", "perplexity", "bits_per_byte", "tokens", "tokens_per_second"}
    assert report["perplexity"] == math.exp(report["loss"])
    tokens, evaluated_bytes = expected_windows(trained_base, corpus.read_text())
    assert report["tokens"] == tokens
    bits = report["loss"] / math.log(2) * tokens
    assert math.isclose(report["bits_per_byte"], bits / evaluated_bytes, rel_tol=1e-12)
    assert report["tokens_per_second"] > 0

    other = tmp_path / "ledger.txt"
    other.write_text(unrelated_text(300))
    # The table, through the CLI's entry point in this process.
    code, out, err = cli_in_process("eval", trained_base, other, "--backend", "cpu")
    assert code == 0, err
    table = dict(line.rsplit(maxsplit=1) for line in out.splitlines())
    assert set(table) == {"loss", "perplexity", "bits per byte", "tokens", "tokens/s"}
    # The model knows its training text far better than text it never saw.
    assert report["loss"] < 0.5 * float(table["loss"])


def test_byte_counts_are_exact_for_multibyte_text_split_across_tokens():
    tokenizer = load_tokenizer()
    lengths = token_byte_lengths(tokenizer)
    text = "café naïve 日本語 🍜   spaces\n<|endoftext|>Ünïcödé — ok\n"
    ids = np.asarray(tokenizer.encode(text))
    assert text_bytes(ids, lengths) == len(text.encode("utf-8"))
    # " 🍜" is split over tokens that are not whole characters: decoded alone each would
    # read U+FFFD, but each counts the bytes it holds.
    noodle_ids = tokenizer.encode(" 🍜")
    assert sum(len(tokenizer.decode([i]).encode("utf-8")) for i in noodle_ids) != 5
    assert text_bytes(np.asarray(noodle_ids), lengths) == len(" 🍜".encode()) == 5


def test_eval_rejects_a_corpus_shorter_than_one_window(trained_base, tmp_path, cli_in_process):
    corpus = tmp_path / "short.txt"
    corpus.write_text("once upon a time\n")
    code, out, err = cli_in_process("eval", trained_base, corpus, "--backend", "cpu")
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith(f"error: corpus {corpus} too small to evaluate: it has ")
    assert err.splitlines()[-1].endswith("one window of 64 needs 65")

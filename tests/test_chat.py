"""`noodle chat`: streaming text, the three modes, model loading errors, and end to end on a
model trained on a generated corpus."""

from __future__ import annotations

import builtins
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from noodle import chat
from noodle.chat import BANNER, ChatOptions, TextStream, open_session
from noodle.checkpoint import load_model
from noodle.errors import NoodleError
from noodle.inference import generate
from noodle.sampling import SamplingSettings
from noodle.tokenizer import load_tokenizer
from tests.conftest import (
    TINY_CONFIG,
    noodle_command,
    noodle_env,
    run_cli_here,
    run_cli_on_one_thread,
    run_noodle,
    story_corpus,
    write_small_tokenizer,
)
from tests.stories import NAMES, PLACES, THINGS

# Subprocesses run on one thread too, for the reason one_torch_thread gives.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0)
# A corpus line: "once upon a time {name} found a {thing} in the {place}. {name} was happy."
TAUGHT_CONTINUATION = re.compile(
    rf" ({'|'.join(THINGS)}) in the ({'|'.join(PLACES)})\. ({'|'.join(NAMES)}) was happy\."
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny model trained on the story corpus through the CLI's entry point, in this
    process (the chat tests below run the CLI as a subprocess)."""
    root = tmp_path_factory.mktemp("chat")
    text = story_corpus(600)
    (root / "corpus.txt").write_text(text)
    write_small_tokenizer(root / "tokenizer.json", text)
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    code, _, err = run_cli_on_one_thread(
        *("train", root / "corpus.txt", root / "model", "--model", root / "tiny.json"),
        *("--tokenizer", root / "tokenizer.json", "--no-cache"),
        *("--backend", "cpu", "--max-steps", 80, "--batch-size", 8),
        *("--lr", 3e-3, "--eval-interval", 40, "--eval-batches", 2),
    )
    assert code == 0, err
    return root / "model"


def chat_cli(model: Path, *args: object, input: str | None = None):
    """`noodle chat` in a subprocess, as a user runs it."""
    return run_noodle("chat", model, "--backend", "cpu", *args, input=input, env=ONE_THREAD)


def chat_in_process(model: Path, *args: object, input: str | bytes, monkeypatch) -> str:
    """The same CLI entry point in this process, quicker when a test needs a second run: what
    it printed on stdout."""
    data = input if isinstance(input, bytes) else input.encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, err = run_cli_here("chat", model, "--backend", "cpu", *args)
    assert code == 0, err
    return out


# Streaming text


def stream_pieces(tokenizer, ids: list[int]) -> list[str]:
    stream = TextStream(tokenizer)
    return [stream.push(token) for token in ids] + [stream.flush()]


def test_a_token_that_ends_mid_character_streams_correctly():
    tokenizer = load_tokenizer()
    text = "日本語 and 🙂!"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # split characters
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # 🙂 is two tokens: the first shows nothing, the second the whole character.
    smile = tokenizer.encode("🙂")
    assert stream_pieces(tokenizer, smile) == ["", "🙂", ""]


def test_a_reply_that_stops_mid_character_ends_with_a_replacement_character():
    tokenizer = load_tokenizer()
    first_half_of_smile = tokenizer.encode("🙂")[:1]
    assert stream_pieces(tokenizer, tokenizer.encode("ok") + first_half_of_smile) == [
        "ok",
        "",
        "\ufffd",
    ]


# End to end, through the CLI


def test_greedy_chat_continues_a_training_prompt_with_what_the_corpus_taught(
    trained_model, monkeypatch
):
    args = ("--prompt", "once upon a time tom found a", "--temperature", 0)
    args += ("--repetition-penalty", 1, "--max-tokens", 16)
    result = chat_cli(trained_model, *args)
    assert result.returncode == 0, result.stderr
    assert TAUGHT_CONTINUATION.match(result.stdout), result.stdout
    assert BANNER not in result.stderr
    again = chat_in_process(trained_model, *args, input="", monkeypatch=monkeypatch)
    assert again == result.stdout  # temperature 0 is deterministic


def test_piped_mode_prints_one_reply_per_input_line_and_replaces_invalid_utf8(
    trained_model, monkeypatch
):
    lines = b"once upon a time mia\n\nonce upon a time \xff\xfe lily\n"
    args = ("--seed", 7, "--max-tokens", 40)
    result = subprocess.run(
        noodle_command(("chat", trained_model, "--backend", "cpu", *args)),
        input=lines,
        capture_output=True,
        env=noodle_env(ONE_THREAD),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode()
    # 40 tokens run past a corpus line, yet each reply stays on one line.
    assert len(replies.splitlines()) == 3 and replies.endswith("\n")
    assert "happy. once upon" in replies
    # No banner: only the warning.
    assert "Noodle" not in replies
    assert result.stderr == b"warning: input line 3: invalid UTF-8 replaced with U+FFFD\n"
    again = chat_in_process(trained_model, *args, input=lines, monkeypatch=monkeypatch)
    assert again == replies  # same seed, same sample


def test_a_broken_model_is_one_error_line(tmp_path, cli_in_process):
    code, out, err = cli_in_process("chat", tmp_path / "missing", "--prompt", "hi")
    assert (code, out) == (1, "")
    assert err == f"error: model {tmp_path / 'missing'}: no such directory\n"


# In-process: precision, the terminal and loading


def next_token_probabilities(model: Path, dtype: str, ids: list[int]) -> torch.Tensor:
    """The cached session's next-token distribution after every prefix of `ids`."""
    session = open_session(ChatOptions(model=str(model), backend="cpu", dtype=dtype)).session
    rows = []
    for token in ids:
        session.push([token])
        rows.append(session.logits().float().softmax(-1))
    return torch.stack(rows)


def test_bfloat16_predicts_what_float32_predicts(trained_model):
    ids = load_model(trained_model).tokenizer.encode(story_corpus(3, seed=1))
    float32 = next_token_probabilities(trained_model, "float32", ids)
    bfloat16 = next_token_probabilities(trained_model, "bfloat16", ids)
    # Measured: at most 0.003 apart. Greedy choices can still differ where the corpus
    # makes two tokens equally likely (which name comes next), so probabilities are
    # compared rather than argmaxes.
    assert (bfloat16 - float32).abs().max() < 0.02


class InterruptingStdout(io.StringIO):
    """Raises KeyboardInterrupt (Ctrl-C) at the n-th write, once."""

    def __init__(self, interrupt_at: int) -> None:
        super().__init__()
        self.writes_left = interrupt_at

    def write(self, text: str) -> int:
        self.writes_left -= 1
        if self.writes_left == 0:
            raise KeyboardInterrupt
        return super().write(text)


def test_terminal_mode_streams_replies_and_ctrl_c_stops_only_the_reply(
    trained_model, monkeypatch, capsys
):
    typed = iter(["once upon a time", "", "once upon a time lily"])

    def type_line():
        line = next(typed, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    monkeypatch.setattr(builtins, "input", type_line)
    stdout = InterruptingStdout(interrupt_at=3)
    monkeypatch.setattr("sys.stdout", stdout)
    options = ChatOptions(model=str(trained_model), backend="cpu", settings=GREEDY, max_tokens=16)
    chat.converse(open_session(options), options, torch.Generator())  # returns at Ctrl-D

    # Ctrl-C came while the third piece was being shown; the next turn goes on from
    # exactly what was shown before it.
    fresh = open_session(options).session
    first = fresh.tokenizer.decode(list(generate(fresh, "once upon a time", 2, GREEDY)))
    second = fresh.tokenizer.decode(list(generate(fresh, "\nonce upon a time lily", 16, GREEDY)))
    assert stdout.getvalue() == f"{first}\n{second}\n"
    prompt_shown = capsys.readouterr().err
    assert BANNER in prompt_shown and prompt_shown.count("> ") == 4  # blank line: no turn


def copy_model(trained_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_model, tmp_path / "model"))


@pytest.mark.parametrize("name", ["model.json", "model.safetensors"])
def test_a_model_loads_from_a_file_inside_its_directory(trained_model, name):
    assert load_model(trained_model / name).directory == trained_model


def test_missing_weights_are_reported(trained_model, tmp_path):
    model = copy_model(trained_model, tmp_path)
    (model / "model.safetensors").unlink()
    with pytest.raises(NoodleError, match=r"model\.safetensors is missing"):
        load_model(model)


def test_a_missing_tokenizer_is_reported(trained_model, tmp_path):
    model = copy_model(trained_model, tmp_path)
    (model / "tokenizer.json").unlink()  # and the packaged one is not the one it learnt
    with pytest.raises(NoodleError, match=r"tokenizer\.json is missing"):
        load_model(model)


def test_malformed_model_json_is_reported(trained_model, tmp_path):
    model = copy_model(trained_model, tmp_path)
    (model / "model.json").write_text('{"n_layers": 2,')
    with pytest.raises(NoodleError, match="malformed JSON"):
        load_model(model)


def test_weights_that_do_not_match_model_json_are_reported(trained_model, tmp_path):
    model = copy_model(trained_model, tmp_path)
    metadata = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**metadata, "emb_dim": 32}))
    with pytest.raises(NoodleError, match=r"weights do not match model\.json"):
        load_model(model)

"""Every command's bad inputs (SPEC, Errors): one `error: ...` line, a non-zero exit (2 for
usage, 1 otherwise), no traceback unless NOODLE_DEBUG=1, and nothing on disk changed.

The cases run the CLI's entry point, `noodle.cli.main`, in-process (a subprocess per case
would spend seconds importing torch); one case also runs as a real subprocess. Add a
command's cases to CASES as it lands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from noodle.cli import main
from tests.conftest import run_noodle, story_corpus
from tests.tiny_runs import TinyRun, directory_snapshot

# The options the resumable model below was trained with; resuming repeats them.
TRAINED_OPTIONS = ("--max-steps", 12, "--batch-size", 8, "--eval-interval", 6, "--eval-batches", 2)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained_model(tiny_run: TinyRun, tmp_path_factory) -> Path:
    """A finished tiny run with its resume state (copied by each test that needs it)."""
    out = tmp_path_factory.mktemp("trained") / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(tiny_run.train_args(out, *TRAINED_OPTIONS))
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 0
    return out


@dataclass
class Inputs:
    """What bad command lines are made of; every file involved lives under `root`."""

    root: Path
    run: TinyRun
    model: Path  # a copy of a trained model directory with its resume state

    @property
    def new_dir(self) -> Path:
        return self.root / "new-model"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def directory(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def damage(self, name: str, content: bytes) -> Inputs:
        """Overwrite the file `name` of the trained model with `content`."""
        (self.model / name).write_bytes(content)
        return self

    def config(self, **changes: object) -> Path:
        """The tiny model's config file with `changes`."""
        config = {**json.loads(self.run.config.read_text()), **changes}
        return self.file("config.json", json.dumps(config))

    def train(
        self, *options: object, corpus: Path | None = None, out: Path | None = None
    ) -> list[str]:
        """`noodle train` of the tiny model; later options override the defaults."""
        run = replace(self.run, corpus=corpus or self.run.corpus)
        return run.train_args(out or self.new_dir, *options)

    def resume(self, *options: object, corpus: Path | None = None) -> list[str]:
        return self.train(*TRAINED_OPTIONS, *options, "--resume", corpus=corpus, out=self.model)


@pytest.fixture
def inputs(tiny_run, trained_model, tmp_path) -> Inputs:
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    return Inputs(tmp_path, tiny_run, model)


def unreadable(path: Path) -> Path:
    path.chmod(0)
    return path


@dataclass(frozen=True)
class BadInput:
    args: Callable[[Inputs], list[str]]
    exit_code: int
    message: str  # a regular expression the error line must match after "error: "


needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")

TRAIN_CASES = {
    # The corpus.
    "missing-corpus": BadInput(
        lambda i: i.train(corpus=i.root / "none.txt"), 1, r"corpus \S+none\.txt: no such file$"
    ),
    "directory-corpus": BadInput(
        lambda i: i.train(corpus=i.root), 1, r"corpus \S+ is a directory, expected a text file$"
    ),
    "empty-corpus": BadInput(
        lambda i: i.train(corpus=i.file("empty.txt", "")), 1, r"corpus \S+empty\.txt is empty$"
    ),
    "unreadable-corpus": BadInput(
        lambda i: i.train(corpus=unreadable(i.file("secret.txt", "text\n"))),
        1,
        r"corpus \S+secret\.txt: permission denied$",
    ),
    "corpus-too-small": BadInput(
        lambda i: i.train(corpus=i.file("tiny.txt", story_corpus(20))),
        1,
        r"corpus too small: it has [\d,]+ tokens, but one training batch \(8 × 64\) and one "
        r"validation window need at least [\d,]+$",
    ),
    # The model, tokenizer and device options.
    "unknown-preset": BadInput(
        lambda i: i.train("--model", "spaghetti"), 2, r"unknown model preset 'spaghetti'"
    ),
    "missing-config": BadInput(
        lambda i: i.train("--model", i.root / "none.json"), 1, r"none\.json: no such file$"
    ),
    "malformed-config": BadInput(
        lambda i: i.train("--model", i.file("bad.json", '{"n_layers": 2,')),
        1,
        r"bad\.json: malformed JSON",
    ),
    "odd-head-dim": BadInput(
        lambda i: i.train("--model", i.config(head_dim=33)), 1, r"head_dim must be even"
    ),
    "zero-layers": BadInput(
        lambda i: i.train("--model", i.config(n_layers=0)),
        1,
        r"n_layers must be a positive integer, got 0",
    ),
    "negative-width": BadInput(
        lambda i: i.train("--model", i.config(emb_dim=-64)),
        1,
        r"emb_dim must be a positive integer, got -64",
    ),
    "unknown-config-key": BadInput(
        lambda i: i.train("--model", i.config(n_layer=2)), 1, r"unknown key\(s\) n_layer"
    ),
    "bad-tokenizer": BadInput(
        lambda i: i.train("--tokenizer", i.file("tok.json", "{}")),
        1,
        r"tok\.json: not a valid tokenizer\.json",
    ),
    "unknown-backend": BadInput(lambda i: i.train("--backend", "tpu"), 2, r"unknown backend 'tpu'"),
    "unknown-dtype": BadInput(lambda i: i.train("--dtype", "float8"), 2, r"unknown dtype 'float8'"),
    "zero-batch-size": BadInput(
        lambda i: i.train("--batch-size", 0), 2, r"--batch-size must be positive, got 0"
    ),
    "missing-argument": BadInput(lambda i: ["train", i.run.corpus], 2, r"Missing argument"),
    "unknown-option": BadInput(lambda i: i.train("--epochs", 3), 2, r"No such option: --epochs"),
    # OUTPUT_DIR.
    "output-dir-is-a-file": BadInput(
        lambda i: i.train(out=i.file("out.txt", "mine")), 1, r"output directory \S+ is a file$"
    ),
    "output-dir-holds-a-model": BadInput(
        lambda i: i.train(out=i.model), 1, r"already holds a model; continue its run with --resume"
    ),
    # --resume.
    "resume-missing-dir": BadInput(
        lambda i: i.train("--resume"), 1, r"nothing to resume: \S+new-model does not exist$"
    ),
    "resume-without-resume-state": BadInput(
        lambda i: i.train("--resume", out=i.directory("empty")),
        1,
        r"nothing to resume: \S+empty/resume\.safetensors does not exist "
        r"\(start without --resume\)$",
    ),
    "resume-other-architecture": BadInput(
        lambda i: i.resume("--model", i.config(emb_dim=32)),
        1,
        r"cannot resume \S+: the run differs from the interrupted one \(architecture\.emb_dim "
        r"was 64, now 32\); resume with the same corpus, model and options$",
    ),
    "resume-other-corpus": BadInput(
        lambda i: i.resume(corpus=i.file("other.txt", story_corpus(600, seed=1))),
        1,
        r"cannot resume \S+: the run differs from the interrupted one \(corpus was '\w+', now",
    ),
    "resume-other-tokenizer": BadInput(
        lambda i: i.resume("--tokenizer", i.file("tok.json", i.run.tokenizer.read_text() + " ")),
        1,
        r"\(tokenizer was '\w+', now '\w+'\)",
    ),
    "resume-other-lr": BadInput(
        lambda i: i.resume("--lr", 0.05), 1, r"\(settings\.lr was 0\.0002, now 0\.05\)"
    ),
    "resume-corrupt-state": BadInput(
        lambda i: i.damage("resume.safetensors", b"\0" * 9).resume(),
        1,
        r"resume\.safetensors: corrupt resume state",
    ),
}

# finetune, eval and chat are stubs in this branch: their argument errors are checked now;
# their input errors are to be added here as the commands land.
STUB_COMMAND_CASES = {
    f"{command}-{problem}": BadInput(lambda i, args=args: args, 2, message)
    for command, arity in (("finetune", 3), ("eval", 2), ("chat", 1))
    for problem, args, message in (
        ("missing-argument", [command], r"Missing argument"),
        ("unknown-option", [command, *["x"] * arity, "--bogus"], r"No such option: --bogus"),
    )
}

CASES = {f"train-{name}": case for name, case in TRAIN_CASES.items()} | STUB_COMMAND_CASES
MARKS = {"train-unreadable-corpus": needs_non_root}


@pytest.mark.parametrize("name", [pytest.param(name, marks=MARKS.get(name, ())) for name in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(name, inputs, capsys):
    case = CASES[name]
    args = case.args(inputs)
    before = directory_snapshot(inputs.root)

    code, stdout, stderr = run_main(args, capsys)

    lines = stderr.splitlines()
    assert code == case.exit_code, stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    assert re.search(case.message, lines[-1].removeprefix("error: ")), lines[-1]
    assert "Traceback" not in stderr and stdout == ""
    assert directory_snapshot(inputs.root) == before


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    missing = tmp_path / "missing.txt"
    result = run_noodle("train", missing, tmp_path / "model", "--backend", "cpu")

    assert result.returncode == 1
    assert result.stderr == f"error: corpus {missing}: no such file\n"
    assert result.stdout == "" and not (tmp_path / "model").exists()


def test_noodle_debug_shows_the_traceback_too(inputs, capsys, monkeypatch):
    monkeypatch.setenv("NOODLE_DEBUG", "1")
    code, _, stderr = run_main(inputs.train(corpus=inputs.root / "none.txt"), capsys)

    assert code == 1
    assert stderr.startswith("Traceback (most recent call last):")
    assert "noodle.errors.NoodleError: corpus" in stderr
    assert stderr.splitlines()[-1].startswith("error: corpus ")


@pytest.mark.usefixtures("one_torch_thread")
def test_invalid_utf8_in_the_corpus_is_replaced_with_a_warning(inputs, capsys):
    text = story_corpus(600).encode()
    corpus = inputs.file("latin1.txt", text[:500] + b"caf\xe9 \xff\xfe" + text[500:])
    args = inputs.train("--max-steps", 4, "--eval-interval", 4, "--eval-batches", 1, corpus=corpus)

    code, stdout, stderr = run_main(args, capsys)

    assert code == 0, stderr
    assert f"warning: corpus {corpus}: 3 invalid UTF-8 byte sequence(s) replaced" in stderr
    assert stdout.startswith("Once upon a time")
    assert json.loads((inputs.new_dir / "model.json").read_text())["training"]["steps"] == 4

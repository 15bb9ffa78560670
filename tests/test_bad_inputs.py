"""Every command's bad inputs (SPEC, Errors): one `error: ...` line, a non-zero exit (2 for
usage, 1 otherwise), no traceback unless NOODLE_DEBUG=1, and nothing on disk changed.

The cases run the CLI's entry point, `noodle.cli.main`, in-process (a subprocess per case
would spend seconds importing torch); one case also runs as a real subprocess. A command's
own cases go in COMMAND_CASES; a command that takes MODEL joins MODEL_COMMANDS and gets every
bad-model case.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from noodle.train.lock import RunLock
from tests.conftest import (
    PAIRS,
    run_cli_on_one_thread,
    run_noodle,
    story_corpus,
    write_instructions,
)
from tests.tiny_runs import TinyRun, directory_snapshot

# The options the resumable model below was trained with; resuming repeats them.
TRAINED_OPTIONS = ("--max-steps", 12, "--batch-size", 8, "--eval-interval", 6, "--eval-batches", 2)


@pytest.fixture(scope="module")
def trained_model(tiny_run: TinyRun, tmp_path_factory) -> Path:
    """A finished tiny run with its resume state (copied by each test that needs it)."""
    out = tmp_path_factory.mktemp("trained") / "model"
    code, _, err = run_cli_on_one_thread(*tiny_run.train_args(out, *TRAINED_OPTIONS))
    assert code == 0, err
    return out


@dataclass
class Inputs:
    """What bad command lines are made of; every file involved lives under `root`."""

    root: Path
    run: TinyRun
    model: Path  # a copy of a trained model directory with its resume state
    held: list[RunLock] = field(default_factory=list)  # run locks the test holds

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

    @property
    def other_model(self) -> Path:
        """A second copy of the trained model, e.g. a model some OUTPUT_DIR already holds."""
        return Path(shutil.copytree(self.model, self.root / "other-model"))

    def instructions(self, pairs: list[tuple[str, str]] = PAIRS) -> Path:
        """An instruction file; the default's 5 examples just fill a batch of 4 and a
        validation example."""
        return write_instructions(self.root / f"qa-{len(pairs)}.txt", pairs)

    def damage(self, name: str, content: bytes) -> Inputs:
        """Overwrite the file `name` of the trained model with `content`."""
        (self.model / name).write_bytes(content)
        return self

    def cut(self, name: str, bytes_lost: int) -> Inputs:
        """Cut the end off the file `name` of the trained model, as an interrupted copy does."""
        return self.damage(name, (self.model / name).read_bytes()[:-bytes_lost])

    def damage_metadata(self, **changes: object) -> Inputs:
        """The trained model's model.json with `changes`."""
        metadata = json.loads((self.model / "model.json").read_text())
        return self.damage("model.json", json.dumps({**metadata, **changes}).encode())

    def remove(self, name: str) -> Inputs:
        """Delete the file `name` of the trained model."""
        (self.model / name).unlink()
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

    def finetune(
        self,
        *options: object,
        model: Path | None = None,
        instructions: Path | None = None,
        out: Path | None = None,
    ) -> list[str]:
        """`noodle finetune` of the trained model on the CPU; options override the defaults."""
        paths = (model or self.model, instructions or self.instructions(), out or self.new_dir)
        return ["finetune", *paths, "--backend", "cpu", *options]

    def eval(
        self, *options: object, model: Path | None = None, corpus: Path | None = None
    ) -> list[str]:
        """`noodle eval` of the trained model on the CPU; options override the defaults."""
        paths = (model or self.model, corpus or self.run.corpus)
        return ["eval", *paths, "--backend", "cpu", *options]

    def chat(self, *options: object, model: Path | None = None) -> list[str]:
        """`noodle chat` of the trained model on the CPU, answering one prompt."""
        return ["chat", model or self.model, "--prompt", "hi", "--backend", "cpu", *options]

    def gzip_cut(self, name: str) -> Path:
        """The story corpus gzip-compressed, with its second half missing."""
        data = gzip.compress(story_corpus(600).encode())
        return self.file(name, data[: len(data) // 2])

    def hold_lock(self, directory: Path) -> Path:
        """`directory`, created, with its run lock held by this process until the test ends."""
        directory.mkdir(exist_ok=True)
        self.held.append(RunLock(directory))
        return directory

    def aborted_start(self) -> Path:
        """An output directory left by a run killed before its first save: model.json and
        tokenizer.json only."""
        directory = self.directory("aborted")
        for name in ("model.json", "tokenizer.json"):
            shutil.copy(self.model / name, directory / name)
        return directory

    def prepare(self, source: Path, destination: Path | None = None) -> list[str]:
        """`noodle prepare-instructions` of `source`, by default into a new file."""
        return ["prepare-instructions", source, destination or self.root / "instructions.txt"]


@pytest.fixture
def inputs(tiny_run, trained_model, tmp_path) -> Iterator[Inputs]:
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    inputs = Inputs(tmp_path, tiny_run, model)
    yield inputs
    for lock in inputs.held:
        lock.release()


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
    "binary-corpus": BadInput(
        lambda i: i.train(corpus=i.file("photo.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 99)),
        1,
        r"corpus \S+photo\.txt is not text: binary data \(a NUL byte at offset 8\); give UTF-8 "
        r"text, plain or compressed with gzip, xz, bzip2 or zstd$",
    ),
    "endless-zero-bytes": BadInput(
        lambda i: i.train(corpus=Path("/dev/zero")),
        1,
        r"corpus /dev/zero is not text: binary data \(a NUL byte at offset 0\)",
    ),
    "utf16-corpus": BadInput(
        lambda i: i.train(corpus=i.file("utf16.txt", story_corpus(5).encode("utf-16"))),
        1,
        r"utf16\.txt is not text: UTF-16 text \(convert it to UTF-8",
    ),
    "truncated-gzip-corpus": BadInput(
        lambda i: i.train(corpus=i.gzip_cut("stories.gz")),
        1,
        r"corpus \S+stories\.gz: damaged or truncated gzip data \(Compressed file ended",
    ),
    "zstd-corpus-without-zstandard": BadInput(
        lambda i: i.train(corpus=i.file("stories.zst", b"\x28\xb5\x2f\xfd" + b"\x01" * 64)),
        1,
        r"corpus \S+stories\.zst is zstd-compressed: reading zstd needs the zstandard package "
        r"\(pip install zstandard, or decompress it first: zstd -d FILE\)$",
    ),
    "unsupported-url-scheme": BadInput(
        lambda i: i.train(corpus="ftp://example.com/stories.txt"),
        2,
        r"corpus ftp://example\.com/stories\.txt: ftp:// is not supported \(give a local path, "
        r"- for standard input, an http:// or https:// URL, or hf://owner/repo/path/to/file\)$",
    ),
    "malformed-url": BadInput(
        lambda i: i.train(corpus="http://[::1/x"),
        2,
        r"corpus http://\[::1/x: invalid URL \(Invalid IPv6 URL\)$",
    ),
    # The model, tokenizer and device options.
    "unknown-preset": BadInput(
        lambda i: i.train("--model", "spaghetti"), 2, r"unknown model preset 'spaghetti'"
    ),
    "mistyped-preset": BadInput(
        lambda i: i.train("--model", "sobaa"),
        2,
        r"unknown model preset 'sobaa'; did you mean 'soba'\? \(choose somen, soba, udon, "
        r"harusame or a CONFIG\.json path\)$",
    ),
    "preset-too-large-for-the-machine": BadInput(
        lambda i: i.train("--model", "udon"),
        1,
        r"model udon \([\d,]+ parameters\) needs about [\d,.]+ GB to train at batch "
        r"size 8 \(weights, gradients and optimizer state [\d,.]+ GB, activations [\d,.]+ GB\), "
        r"but cpu has [\d,.]+ [GM]B available; (presets that fit: somen|no preset fits)",
    ),
    "config-too-wide-for-the-machine": BadInput(
        lambda i: i.train("--model", i.config(emb_dim=10**7)),
        1,
        r"config\.json \([\d,]+ parameters\) needs about [\d,.]+ GB to train",
    ),
    "config-with-an-endless-context": BadInput(
        lambda i: i.train("--model", i.config(ctx_len=10**12)),
        1,
        r"needs about [\d,.]+ GB to train at batch size 8 \(activations [\d,.]+ GB\)",
    ),
    "config-with-a-billion-layers": BadInput(
        lambda i: i.train("--model", i.config(n_layers=10**9)),
        1,
        r"model config: [\d,]+ parameters is beyond any machine \(at most 10,000,000,000,000\)",
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
    "learned-tokenizer-too-small": BadInput(
        lambda i: i.train("--tokenizer", "bpe:12"),
        2,
        r"--tokenizer bpe:12: the vocabulary of a learned tokenizer must be a number from 512 "
        r"to 65,536, e\.g\. bpe:4096$",
    ),
    "learned-tokenizer-from-standard-input": BadInput(
        lambda i: i.train("--tokenizer", "bpe:512", corpus="-"),
        2,
        r"--tokenizer bpe:512 reads the corpus twice \(to learn the tokenizer, then to tokenize "
        r"it\): give a file or URL, not standard input$",
    ),
    "unknown-backend": BadInput(lambda i: i.train("--backend", "tpu"), 2, r"unknown backend 'tpu'"),
    "unknown-dtype": BadInput(lambda i: i.train("--dtype", "float8"), 2, r"unknown dtype 'float8'"),
    "zero-batch-size": BadInput(
        lambda i: i.train("--batch-size", 0), 2, r"--batch-size must be positive, got 0"
    ),
    **{
        f"{option}-{value}": BadInput(
            lambda i, option=option, value=value: i.train(f"--{option}", value),
            2,
            rf"--{option} must be a finite number, got {value}$",
        )
        for option, value in (
            ("lr", "nan"),
            ("lr", "inf"),
            ("min-improvement", "nan"),
            ("save-every", "inf"),
        )
    },
    "unknown-optimizer": BadInput(
        lambda i: i.train("--optimizer", "adam"),
        2,
        r"unknown --optimizer 'adam'; did you mean 'adamw'\? \(choose adamw, muon\)$",
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
    "output-dir-in-use": BadInput(
        lambda i: i.train(out=i.hold_lock(i.new_dir)),
        1,
        rf"\S+new-model is in use: another noodle run \(process {os.getpid()}\) is writing it; "
        r"wait for it to end or choose another output directory$",
    ),
    "resume-a-run-that-never-saved": BadInput(
        lambda i: i.train("--resume", out=i.aborted_start()),
        1,
        r"nothing to resume: \S+aborted/resume\.safetensors does not exist \(start without "
        r"--resume\)$",
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
        r"cannot resume \S+: the run differs from the interrupted one in --model: its emb_dim "
        r"was 64, now 32; resume with the same corpus, model and options$",
    ),
    "resume-other-corpus": BadInput(
        lambda i: i.resume(corpus=i.file("other.txt", story_corpus(600, seed=1))),
        1,
        r"cannot resume \S+: the run differs from the interrupted one in the corpus: its text "
        r"differs from what the run trained on \(\S+stories\.txt\), edited or another file;",
    ),
    "resume-other-tokenizer": BadInput(
        lambda i: i.resume("--tokenizer", i.file("tok.json", i.run.tokenizer.read_text() + " ")),
        1,
        r"in --tokenizer: another tokenizer than the run's \S+/model/tokenizer\.json;",
    ),
    "resume-other-lr": BadInput(
        lambda i: i.resume("--lr", 0.05), 1, r"in --lr was 0\.0002, now 0\.05;"
    ),
    "resume-other-eval-batches": BadInput(
        lambda i: i.resume("--eval-batches", 20), 1, r"in --eval-batches was 2, now 20;"
    ),
    "resume-corrupt-state": BadInput(
        lambda i: i.damage("resume.safetensors", b"\0" * 9).resume(),
        1,
        r"resume\.safetensors: corrupt resume state",
    ),
}

FINETUNE_CASES = {
    # The instruction file.
    "missing-instructions": BadInput(
        lambda i: i.finetune(instructions=i.root / "none.txt"),
        1,
        r"instruction file \S+none\.txt: no such file$",
    ),
    "directory-instructions": BadInput(
        lambda i: i.finetune(instructions=i.directory("data")),
        1,
        r"instruction file \S+data is a directory, expected a text file$",
    ),
    "empty-instructions": BadInput(
        lambda i: i.finetune(instructions=i.file("empty.txt", "")),
        1,
        r"instruction file \S+empty\.txt is empty$",
    ),
    "no-valid-example": BadInput(
        lambda i: i.finetune(instructions=i.file("prose.txt", story_corpus(5))),
        1,
        r"prose\.txt: no valid example \(each needs a ### Instruction: and a ### Response: "
        r"section, examples separated by <\|endoftext\|>\)$",
    ),
    "too-few-examples": BadInput(
        lambda i: i.finetune(instructions=i.instructions(PAIRS[:3])),
        1,
        r"too few examples: it has 3 valid example\(s\), but one training batch of 4 and one "
        r"validation example need at least 5 \(lower --batch-size or add examples\)$",
    ),
    # OUTPUT_DIR.
    "output-dir-is-a-file": BadInput(
        lambda i: i.finetune(out=i.file("out.txt", "mine")), 1, r"output directory \S+ is a file$"
    ),
    "output-dir-holds-a-model": BadInput(
        lambda i: i.finetune(out=i.other_model),
        1,
        r"already holds a model; continue its run with --resume",
    ),
    "output-dir-is-the-base-model": BadInput(
        lambda i: i.finetune(model=i.model / "model.json", out=i.model),
        1,
        r"\S+ is the base model's directory; fine-tune into another one$",
    ),
    # --resume.
    "resume-missing-dir": BadInput(
        lambda i: i.finetune("--resume"), 1, r"nothing to resume: \S+new-model does not exist$"
    ),
    "lr-nan": BadInput(lambda i: i.finetune("--lr", "nan"), 2, r"--lr must be a finite number"),
    "output-dir-in-use": BadInput(
        lambda i: i.finetune(out=i.hold_lock(i.new_dir)),
        1,
        rf"\S+new-model is in use: another noodle run \(process {os.getpid()}\) is writing it",
    ),
    "resume-without-resume-state": BadInput(
        lambda i: i.finetune("--resume", out=i.directory("empty")),
        1,
        r"nothing to resume: \S+empty/resume\.safetensors does not exist",
    ),
    "resume-a-train-run": BadInput(
        lambda i: i.finetune("--resume", out=i.other_model),
        1,
        r"cannot resume \S+: the run differs from the interrupted one in the base model: was "
        r"none \(a run of noodle train\), now \S+",
    ),
    # LoRA's options (resuming with other adapters: tests/test_lora.py).
    "lora-rank-zero": BadInput(
        lambda i: i.finetune("--lora-rank", 0), 2, r"^--lora-rank must be positive, got 0$"
    ),
    "lora-rank-negative": BadInput(
        lambda i: i.finetune("--lora-rank", -4), 2, r"^--lora-rank must be positive, got -4$"
    ),
    "lora-rank-not-a-number": BadInput(
        lambda i: i.finetune("--lora-rank", "high"), 2, r"Invalid value for '--lora-rank'"
    ),
    "lora-alpha-nan": BadInput(
        lambda i: i.finetune("--lora-rank", 4, "--lora-alpha", "nan"),
        2,
        r"^--lora-alpha must be a finite number, got nan$",
    ),
    "lora-alpha-infinite": BadInput(
        lambda i: i.finetune("--lora-rank", 4, "--lora-alpha", "inf"),
        2,
        r"^--lora-alpha must be a finite number, got inf$",
    ),
    "lora-alpha-zero": BadInput(
        lambda i: i.finetune("--lora-rank", 4, "--lora-alpha", 0),
        2,
        r"^--lora-alpha must be positive, got 0\.0$",
    ),
    "lora-unknown-target": BadInput(
        lambda i: i.finetune("--lora-rank", 4, "--lora-targets", "qkv,mlp"),
        2,
        r"^unknown --lora-targets 'mlp' \(choose qkv, proj, up, down\)$",
    ),
    "lora-misspelt-target": BadInput(
        lambda i: i.finetune("--lora-rank", 4, "--lora-targets", "dwon"),
        2,
        r"^unknown --lora-targets 'dwon'; did you mean 'down'\? \(choose qkv, proj, up, down\)$",
    ),
    "lora-alpha-without-rank": BadInput(
        lambda i: i.finetune("--lora-alpha", 8),
        2,
        r"^--lora-alpha needs --lora-rank \(LoRA adapters' rank\)$",
    ),
    "lora-targets-without-rank": BadInput(
        lambda i: i.finetune("--lora-targets", "qkv"),
        2,
        r"^--lora-targets needs --lora-rank \(LoRA adapters' rank\)$",
    ),
    "lora-with-muon": BadInput(
        lambda i: i.finetune("--lora-rank", 4, "--optimizer", "muon"),
        2,
        r"^--optimizer muon orthogonalises the blocks' whole matrices, which LoRA freezes; "
        r"train adapters with --optimizer adamw$",
    ),
}

EVAL_CASES = {
    "missing-corpus": BadInput(
        lambda i: i.eval(corpus=i.root / "none.txt"), 1, r"corpus \S+none\.txt: no such file$"
    ),
    "directory-corpus": BadInput(
        lambda i: i.eval(corpus=i.root), 1, r"corpus \S+ is a directory, expected a text file$"
    ),
    "empty-corpus": BadInput(
        lambda i: i.eval(corpus=i.file("empty.txt", "")), 1, r"corpus \S+empty\.txt is empty$"
    ),
    "corpus-shorter-than-a-window": BadInput(
        lambda i: i.eval(corpus=i.file("tiny.txt", story_corpus(1))),
        1,
        r"corpus \S+tiny\.txt too small to evaluate: it has \d+ tokens, one window of 64 "
        r"needs 65$",
    ),
    "zero-batch-size": BadInput(
        lambda i: i.eval("--batch-size", 0), 2, r"--batch-size must be positive, got 0$"
    ),
}

CHAT_CASES = {
    "zero-max-tokens": BadInput(
        lambda i: i.chat("--max-tokens", 0), 2, r"--max-tokens must be positive, got 0$"
    ),
    "negative-top-k": BadInput(
        lambda i: i.chat("--top-k", -1), 2, r"top-k must be 0 \(off\) or positive, got -1$"
    ),
    "top-p-above-one": BadInput(
        lambda i: i.chat("--top-p", 1.5), 2, r"top-p must be in \(0, 1\], got 1\.5$"
    ),
    "temperature-nan": BadInput(
        lambda i: i.chat("--temperature", "nan"),
        2,
        r"temperature must be a finite number, got nan$",
    ),
    "top-p-nan": BadInput(lambda i: i.chat("--top-p", "nan"), 2, r"top-p must be in \(0, 1\]"),
    "infinite-repetition-penalty": BadInput(
        lambda i: i.chat("--repetition-penalty", "inf"),
        2,
        r"repetition penalty must be a positive finite number, got inf$",
    ),
    "zero-repetition-penalty": BadInput(
        lambda i: i.chat("--repetition-penalty", 0),
        2,
        r"repetition penalty must be a positive finite number, got 0\.0$",
    ),
}

RECORD = '{"instruction": "name a colour", "output": "blue"}'
PREPARE_CASES = {
    "missing-input": BadInput(
        lambda i: i.prepare(i.root / "none.jsonl"), 1, r"\S+none\.jsonl: no such file$"
    ),
    "directory-input": BadInput(
        lambda i: i.prepare(i.directory("data")),
        1,
        r"\S+data is a directory, expected a JSON or JSONL file$",
    ),
    "input-not-utf8": BadInput(
        lambda i: i.prepare(
            i.file("latin1.jsonl", RECORD.replace("colour", "c\xf6lour").encode("latin-1"))
        ),
        1,
        r"latin1\.jsonl: cannot read \('utf-8' codec can't decode",
    ),
    "malformed-json": BadInput(
        lambda i: i.prepare(i.file("records.json", f"[{RECORD},")),
        1,
        r"records\.json: malformed JSON at line 1 \(Expecting value\)$",
    ),
    "malformed-jsonl": BadInput(
        lambda i: i.prepare(i.file("records.jsonl", f'{RECORD}\n{{"instruction": \n')),
        1,
        r"records\.jsonl: malformed JSON at line 2 \(Expecting value\)$",
    ),
    "no-usable-record": BadInput(
        lambda i: i.prepare(
            i.file("records.jsonl", '{"question": "a", "answer": "b"}\n[1]\n{"instruction": ""}\n')
        ),
        1,
        r"records\.jsonl: no record has both an instruction and a response$",
    ),
    "output-is-a-directory": BadInput(
        lambda i: i.prepare(i.file("records.jsonl", RECORD), i.directory("out")),
        1,
        r"\S+out is a directory, expected a file path$",
    ),
    "output-inside-a-file": BadInput(
        lambda i: i.prepare(i.file("records.jsonl", RECORD), i.file("out", "mine") / "qa.txt"),
        1,
        r"cannot create directory \S+out: File exists$",
    ),
    "output-exists": BadInput(
        lambda i: i.prepare(i.file("records.jsonl", RECORD), i.file("qa.txt", "mine")),
        1,
        r"\S+qa\.txt already exists; add --force to overwrite it$",
    ),
    "output-is-the-input": BadInput(
        lambda i: i.prepare(i.file("records.jsonl", RECORD), i.root / "records.jsonl"),
        1,
        r"\S+records\.jsonl is the input file; write the instruction file elsewhere$",
    ),
}

EXPORT_CASES = {
    "out-dir-not-empty": BadInput(
        lambda i: ["export", i.model, i.other_model],
        1,
        r"\S+other-model exists and is not empty; export into a new or empty directory$",
    ),
    "out-dir-is-a-file": BadInput(
        lambda i: ["export", i.model, i.file("out.txt", "mine")],
        1,
        r"output directory \S+ is a file$",
    ),
}

PLOT_CASES = {
    "missing-run": BadInput(
        lambda i: ["plot", i.root / "none"], 1, r"run \S+none: no such directory$"
    ),
    "directory-without-metrics": BadInput(
        lambda i: ["plot", i.model, i.directory("empty")],
        1,
        r"run \S+empty: \S+empty has no metrics\.jsonl \(not a training run's directory\)$",
    ),
    "metrics-without-training-records": BadInput(
        lambda i: ["plot", i.file("metrics.jsonl", '{"kind": "eval", "step": 5}\n{"kind"')],
        1,
        r"metrics\.jsonl holds no training records yet$",
    ),
    "unknown-image-format": BadInput(
        lambda i: ["plot", i.model, "-o", i.root / "curves.txt"],
        2,
        r"cannot write \S+curves\.txt: name a file ending in one of .*\.png",
    ),
    "output-in-a-missing-directory": BadInput(
        lambda i: ["plot", i.model, "-o", i.root / "none" / "curves.png"],
        1,
        r"cannot write \S+curves\.png: \S+none is not a directory$",
    ),
    "bad-size": BadInput(
        lambda i: ["plot", i.model, "--size", "large"],
        2,
        r"--size must be WIDTHxHEIGHT in pixels, each at least 100, got 'large'$",
    ),
}

# Each command's own cases; a case named NAME here runs as COMMAND-NAME.
COMMAND_CASES = {
    "train": TRAIN_CASES,
    "finetune": FINETUNE_CASES,
    "eval": EVAL_CASES,
    "chat": CHAT_CASES,
    "prepare-instructions": PREPARE_CASES,
    "export": EXPORT_CASES,
    "plot": PLOT_CASES,
}

# The commands that take MODEL, each run on the model directory or file given.
MODEL_COMMANDS: dict[str, Callable[[Inputs, Path], list[str]]] = {
    "finetune": lambda i, model: i.finetune(model=model),
    "eval": lambda i, model: i.eval(model=model),
    "info": lambda i, model: ["info", model],
    "chat": lambda i, model: i.chat(model=model),
    "export": lambda i, model: ["export", model, i.root / "exported"],
}


@dataclass(frozen=True)
class BadModel:
    make: Callable[[Inputs], Path]  # the MODEL argument, made from the trained model
    message: str  # as in BadInput, the same for every command


BAD_MODELS = {
    "missing-model-dir": BadModel(lambda i: i.root / "none", r"model \S+none: no such directory$"),
    "model-is-another-file": BadModel(
        lambda i: i.model / "metrics.jsonl",
        r"metrics\.jsonl: expected a model directory, model\.json or model\.safetensors$",
    ),
    "model-json-missing": BadModel(
        lambda i: i.remove("model.json").model, r"model\.json is missing from \S+model$"
    ),
    "weights-missing": BadModel(
        lambda i: i.remove("model.safetensors").model,
        r"model\.safetensors is missing from \S+model$",
    ),
    "tokenizer-missing": BadModel(
        lambda i: i.remove("tokenizer.json").model, r"tokenizer\.json is missing from \S+model$"
    ),
    "malformed-model-json": BadModel(
        lambda i: i.damage("model.json", b'{"n_layers": 2,').model,
        r"model\.json: malformed JSON \(Expecting property name",
    ),
    "model-json-not-an-object": BadModel(
        lambda i: i.damage("model.json", b"[]").model,
        r"model\.json: expected a JSON object with architecture keys$",
    ),
    "model-json-invalid-architecture": BadModel(
        lambda i: i.damage_metadata(head_dim=33).model,
        r"model\.json: model config: head_dim must be even for rotary embeddings, got 33$",
    ),
    "corrupt-tokenizer": BadModel(
        lambda i: i.damage("tokenizer.json", b"{}").model,
        r"tokenizer\.json: not a valid tokenizer\.json",
    ),
    "corrupt-weights": BadModel(
        lambda i: i.damage("model.safetensors", b"\0" * 9).model, r"unreadable weights \("
    ),
    "truncated-weights": BadModel(
        lambda i: i.cut("model.safetensors", 8).model,
        r"unreadable weights \(.*not fully covered",
    ),
    "weights-of-another-width": BadModel(
        lambda i: i.damage_metadata(emb_dim=32).model,
        r"weights do not match model\.json \(tok_emb\.weight is \(\d+, 64\), expected "
        r"\(\d+, 32\)\)$",
    ),
    "weights-with-fewer-layers": BadModel(
        lambda i: i.damage_metadata(n_layers=3).model,
        r"weights do not match model\.json \(missing blocks\.2\.",
    ),
    "weights-with-more-layers": BadModel(
        lambda i: i.damage_metadata(n_layers=1).model,
        r"weights do not match model\.json \(unexpected blocks\.1\.",
    ),
    "newer-format-version": BadModel(
        lambda i: i.damage_metadata(format_version=99).model,
        r"model\.json: format version 99 is newer than this noodle \(\S+\) reads \(version 1\); "
        r"upgrade noodle to use this model$",
    ),
    "a-billion-layers": BadModel(
        lambda i: i.damage_metadata(n_layers=10**9).model,
        r"model config: [\d,]+ parameters is beyond any machine",
    ),
    # Within the cap: checking the weights walks model.json's tensors only as far as the
    # file's, where building the model (even on the meta device) would take minutes.
    "a-million-layers": BadModel(
        lambda i: i.damage_metadata(n_layers=10**6).model,
        r"weights do not match model\.json \(missing blocks\.2\.",
    ),
    "vocabulary-smaller-than-the-tokenizer": BadModel(
        lambda i: i.damage_metadata(vocab_size=100).model,
        r"tokenizer has \d+ tokens but the model only 100$",
    ),
}

MODEL_CASES = {
    f"{command}-{problem}": BadInput(
        lambda i, run=run, bad=bad: run(i, bad.make(i)), 1, bad.message
    )
    for command, run in MODEL_COMMANDS.items()
    for problem, bad in BAD_MODELS.items()
}

# Every command that computes refuses an unknown device or precision (info and export only
# read and write files).
DEVICE_CASES = {
    f"{command}-unknown-{option}": BadInput(
        lambda i, run=run, option=option, value=value: [*run(i, i.model), f"--{option}", value],
        2,
        rf"unknown {option} '{value}'",
    )
    for command, run in MODEL_COMMANDS.items()
    if command not in ("info", "export")
    for option, value in (("backend", "tpu"), ("dtype", "float8"))
}

# Argument errors of every command but train (whose own cases have them); chat is a stub in
# this branch.
ARGUMENT_CASES = {
    f"{command}-{problem}": BadInput(lambda i, args=args: args, 2, message)
    for command, arity in (
        ("finetune", 3),
        ("eval", 2),
        ("chat", 1),
        ("info", 1),
        ("prepare-instructions", 2),
        ("export", 2),
        ("plot", 1),
    )
    for problem, args, message in (
        ("missing-argument", [command], r"Missing argument"),
        ("unknown-option", [command, *["x"] * arity, "--bogus"], r"No such option: --bogus"),
    )
}

CASES = (
    {
        f"{command}-{name}": case
        for command, cases in COMMAND_CASES.items()
        for name, case in cases.items()
    }
    | MODEL_CASES
    | DEVICE_CASES
    | ARGUMENT_CASES
)
MARKS = {
    "train-unreadable-corpus": needs_non_root,
    "train-zstd-corpus-without-zstandard": pytest.mark.skipif(
        importlib.util.find_spec("zstandard") is not None, reason="zstandard is installed"
    ),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=MARKS.get(name, ())) for name in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(name, inputs, cli_in_process):
    case = CASES[name]
    args = case.args(inputs)
    before = directory_snapshot(inputs.root)

    code, stdout, stderr = cli_in_process(*args)

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


@pytest.mark.parametrize("name", ["train-missing-corpus", "eval-weights-of-another-width"])
def test_noodle_debug_shows_the_traceback_too(name, inputs, cli_in_process, monkeypatch):
    monkeypatch.setenv("NOODLE_DEBUG", "1")
    case = CASES[name]
    code, _, stderr = cli_in_process(*case.args(inputs))

    assert code == case.exit_code
    assert stderr.startswith("Traceback (most recent call last):")
    assert "noodle.errors.NoodleError: " in stderr
    assert re.search(case.message, stderr.splitlines()[-1].removeprefix("error: "))


def with_invalid_utf8(inputs: Inputs) -> Path:
    """The story corpus with three invalid UTF-8 sequences in it."""
    text = story_corpus(600).encode()
    return inputs.file("latin1.txt", text[:500] + b"caf\xe9 \xff\xfe" + text[500:])


def invalid_utf8_warning(corpus: Path) -> str:
    return f"warning: corpus {corpus}: 3 invalid UTF-8 byte sequence(s) replaced"


@pytest.mark.usefixtures("one_torch_thread")
def test_invalid_utf8_in_the_corpus_is_replaced_with_a_warning(inputs, cli_in_process):
    corpus = with_invalid_utf8(inputs)
    args = inputs.train("--max-steps", 4, "--eval-interval", 4, "--eval-batches", 1, corpus=corpus)

    code, stdout, stderr = cli_in_process(*args)

    assert code == 0, stderr
    assert invalid_utf8_warning(corpus) in stderr
    assert stdout.startswith("Once upon a time")
    assert json.loads((inputs.new_dir / "model.json").read_text())["training"]["steps"] == 4


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_replaces_invalid_utf8_with_a_warning_and_evaluates(inputs, cli_in_process):
    corpus = with_invalid_utf8(inputs)

    code, stdout, stderr = cli_in_process(*inputs.eval("--json", corpus=corpus))

    assert code == 0, stderr
    assert invalid_utf8_warning(corpus) in stderr
    assert json.loads(stdout)["tokens"] > 0


def test_a_directory_whose_run_died_before_its_first_save_is_taken_over(inputs, cli_in_process):
    directory = inputs.aborted_start()
    (directory / "metrics.jsonl").write_text('{"kind": "train", "step": 3}\n')
    args = inputs.train("--max-steps", 2, "--eval-interval", 2, "--eval-batches", 1, out=directory)

    code, _, stderr = cli_in_process(*args)

    assert code == 0, stderr
    assert f"{directory} holds a run that stopped before its first save: replaced" in stderr
    summary = json.loads((directory / "model.json").read_text())["training"]
    assert summary["status"] == "finished" and summary["steps"] == 2
    steps = [json.loads(line)["step"] for line in (directory / "metrics.jsonl").open()]
    assert 3 not in steps  # the dead run's records are gone


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_drops_a_damaged_metrics_line_with_a_warning(inputs, cli_in_process):
    metrics = inputs.model / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = '{"kind": "train", "st\x00\x00 damaged\n'
    metrics.write_text("".join(lines) + '{"kind": "tr')  # and a torn last line

    code, _, stderr = cli_in_process(*inputs.resume("--max-steps", 14))

    assert code == 0, stderr
    assert [line for line in stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {metrics}: dropped 1 damaged line(s) (line 2)"
    ]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 14
    assert len(records) == len(lines) - 1 + 2  # kept, less the damaged one, plus steps 13-14


@pytest.mark.usefixtures("one_torch_thread")
def test_a_corpus_of_only_line_breaks_is_warned_about(inputs, cli_in_process):
    corpus = inputs.file("newlines.txt", "\n" * 20_000)

    code, _, stderr = cli_in_process(*inputs.eval(corpus=corpus))

    assert code == 0, stderr
    assert (
        f"warning: corpus {corpus} holds no text, only whitespace (" in stderr
        and "tokens of spaces and line breaks): a model learns nothing from it" in stderr
    )

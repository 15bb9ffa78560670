"""The byte-level BPE tokenizer, shipped inside the package so nothing is downloaded, and
smaller ones learned from a corpus (`--tokenizer bpe:N`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from noodle.errors import NoodleError, UsageError
from noodle.interruptible import read_all

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"
# `--tokenizer` names: the packaged tokenizer, or one to learn from the corpus (bpe:N).
BUNDLED = "gpt-neox"
LEARNED_PREFIX = "bpe:"
# Every byte is a token (256) besides the two special ones; a model's vocabulary is padded
# to a multiple of 128 and indexed by uint16 in the token cache up to 65,536.
MIN_LEARNED_VOCABULARY = 512
MAX_LEARNED_VOCABULARY = 65536


def packaged_tokenizer_path() -> Path:
    return Path(str(resources.files("noodle") / "assets" / "tokenizer.json"))


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the identity and special ids Noodle records; `raw` is
    its tokenizer.json, `origin` names it in messages."""

    def __init__(self, raw: bytes, origin: str) -> None:
        try:
            self.backend = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:
            raise NoodleError(f"{origin}: not a valid tokenizer.json ({exc})") from None
        self.raw = raw
        self.sha256 = hashlib.sha256(self.raw).hexdigest()
        self.vocab_size = self.backend.get_vocab_size()
        self.eot_id = self.backend.token_to_id(END_OF_TEXT)
        if self.eot_id is None:
            raise NoodleError(f"{origin}: the tokenizer has no {END_OF_TEXT} token")
        self.pad_id = self.backend.token_to_id(PADDING)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def identity(self) -> dict:
        return {
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "end_of_text_id": self.eot_id,
            "padding_id": self.pad_id,
        }


def load_tokenizer(path: str | Path | None = None) -> TextTokenizer:
    """The tokenizer at `path`, or (None or BUNDLED) the packaged GPT-NeoX-20B one."""
    path = packaged_tokenizer_path() if path in (None, BUNDLED) else Path(path)
    try:
        raw = read_all(path)
    except FileNotFoundError:
        raise NoodleError(f"{path}: tokenizer file not found") from None
    except OSError as exc:
        raise NoodleError(f"{path}: not a valid tokenizer.json ({exc.strerror})") from None
    return TextTokenizer(raw, str(path))


def learned_vocabulary(spec: str | None) -> int | None:
    """N for a `--tokenizer bpe:N` (a tokenizer to learn from the corpus), else None."""
    if spec is None or not spec.startswith(LEARNED_PREFIX):
        return None
    size = spec.removeprefix(LEARNED_PREFIX)
    if not size.isdigit() or not MIN_LEARNED_VOCABULARY <= int(size) <= MAX_LEARNED_VOCABULARY:
        raise UsageError(
            f"--tokenizer {spec}: the vocabulary of a learned tokenizer must be a number "
            f"from {MIN_LEARNED_VOCABULARY} to {MAX_LEARNED_VOCABULARY:,}, e.g. bpe:4096"
        )
    return int(size)


def learn_tokenizer(lines: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE of at most `vocab_size` tokens learned from `lines`, with the special
    tokens of the bundled tokenizer at the same ids (<|endoftext|> 0, <|padding|> 1). Any
    text can be encoded (every byte is a token); the same lines give the same tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    return TextTokenizer(tokenizer.to_str().encode("utf-8"), f"a {vocab_size}-token BPE")

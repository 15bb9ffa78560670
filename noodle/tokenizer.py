"""The byte-level BPE tokenizer, shipped inside the package so nothing is downloaded."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

from noodle.errors import NoodleError

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"


def packaged_tokenizer_path() -> Path:
    return Path(str(resources.files("noodle") / "assets" / "tokenizer.json"))


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the identity and special ids Noodle records."""

    def __init__(self, path: Path) -> None:
        try:
            self.raw = path.read_bytes()
            self.backend = Tokenizer.from_str(self.raw.decode("utf-8"))
        except FileNotFoundError:
            raise NoodleError(f"{path}: tokenizer file not found") from None
        except (OSError, UnicodeDecodeError, Exception) as exc:
            raise NoodleError(f"{path}: not a valid tokenizer.json ({exc})") from None
        self.path = path
        self.sha256 = hashlib.sha256(self.raw).hexdigest()
        self.vocab_size = self.backend.get_vocab_size()
        self.eot_id = self.backend.token_to_id(END_OF_TEXT)
        if self.eot_id is None:
            raise NoodleError(f"{path}: the tokenizer has no {END_OF_TEXT} token")
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
    """The tokenizer at `path`, or the packaged GPT-NeoX-20B one."""
    return TextTokenizer(Path(path) if path else packaged_tokenizer_path())

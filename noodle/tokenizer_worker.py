"""A tokenizer process (`corpus` starts one per core): reads a tokenizer.json, then blocks
of whole lines, from standard input, and writes each block's token ids to standard output.

Its blocks and their decoding are shared with the command's own in-process path. The
processes start at once, all of them, so this module imports the encoders and no more: not
numpy, nor the corpus machinery (with them, a start took three times as long on a 16-core
machine: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import array
import itertools
import os
import struct
import sys
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, normalizers
from tokenizers.normalizers import Normalizer

from noodle.errors import NoodleError
from noodle.tiktoken_bpe import tiktoken_for_json
from noodle.tokenizer import TextTokenizer

# The frames: the input's length before it (the tokenizer.json, then each block); a
# result's token count, invalid UTF-8 sequences and blankness before its ids.
BLOCK_HEADER = struct.Struct("<Q")
RESULT_HEADER = struct.Struct("<QQ?")
UNICODE_NORMALIZATIONS = (normalizers.NFC, normalizers.NFD, normalizers.NFKC, normalizers.NFKD)
REPLACEMENT = "\ufffd"


def token_itemsize(vocab_size: int) -> int:
    """Bytes per token id in a token stream: 2 up to 65,536 ids, else 4."""
    return 2 if vocab_size <= 1 << 16 else 4


def id_array(ids: Iterable[int], itemsize: int) -> array.array:
    return array.array("H" if itemsize == 2 else "I", ids)


def decode_text(data: bytes) -> tuple[str, int, bool]:
    """The text of `data`, the count of its invalid UTF-8 sequences, and whether `data` is
    nothing but (ASCII) whitespace."""
    try:
        text, replaced = data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        replaced = text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))
    return text, replaced, not data or data.isspace()


def split_lines(text: str) -> list[str]:
    """The lines of `text`, each with its newline, except a last line that has none."""
    lines = text.split("\n")
    last = lines.pop()
    lines = [line + "\n" for line in lines]
    if last:
        lines.append(last)
    return lines


class BlockEncoder:
    """Token ids of a block of whole lines, each line encoded on its own, in one thread:
    by tiktoken for the bundled tokenizer (`tiktoken_bpe`), else by tokenizers, built
    from the tokenizer.json only then (a tenth of a tokenizer process's start).

    Unicode normalization (NFC and its kin) leaves ASCII text as it is, so tokenizers
    encodes ASCII lines with the normalizer switched off (13% fewer instructions on
    Gutenberg text): the encoder owns its tokenizer.
    """

    def __init__(self, tokenizer_json: bytes) -> None:
        self.fast = tiktoken_for_json(tokenizer_json)
        self.backend: Tokenizer | None = None
        self.normalizer: Normalizer | None = None
        if self.fast:
            # The bundled tokenizer's size (a test checks that tokenizers says the same).
            self.itemsize = token_itemsize(self.fast.vocab_size)
            return
        tokenizer = TextTokenizer(tokenizer_json, "the tokenizer")
        self.backend = tokenizer.backend
        self.normalizer = self.backend.normalizer
        self.itemsize = token_itemsize(tokenizer.vocab_size)

    def __call__(self, data: bytes) -> tuple[array.array, int, bool]:
        """The ids of a block of lines, its invalid UTF-8 sequences and its blankness."""
        text, replaced, blank = decode_text(data)
        return self.ids(text), replaced, blank

    def ids(self, text: str) -> array.array:
        """The ids of a block of whole lines."""
        if self.fast:
            return id_array(self.fast(text), self.itemsize)
        encodings = self.encodings(split_lines(text), text.isascii())
        return id_array(itertools.chain.from_iterable(e.ids for e in encodings), self.itemsize)

    def encodings(self, lines: list[str], all_ascii: bool) -> list:
        if not isinstance(self.normalizer, UNICODE_NORMALIZATIONS):
            return self.encode(lines)
        if all_ascii:
            return self.encode(lines, normalize=False)
        is_ascii = [line.isascii() for line in lines]
        ascii_lines = [line for line, flag in zip(lines, is_ascii, strict=True) if flag]
        other_lines = [line for line, flag in zip(lines, is_ascii, strict=True) if not flag]
        ascii_encodings = iter(self.encode(ascii_lines, normalize=False))
        other_encodings = iter(self.encode(other_lines))
        return [next(ascii_encodings if flag else other_encodings) for flag in is_ascii]

    def encode(self, lines: list[str], normalize: bool = True) -> list:
        if normalize:
            return self.backend.encode_batch_fast(lines, add_special_tokens=False)
        self.backend.normalizer = None  # switching costs ~40 us
        try:
            return self.backend.encode_batch_fast(lines, add_special_tokens=False)
        finally:
            self.backend.normalizer = self.normalizer


def serve() -> None:
    """Read the tokenizer.json, then blocks of lines, each frame its 8-byte length and its
    bytes; write for each block a RESULT_HEADER and the ids. Ends at the end of the input,
    which comes when the command ends or dies."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def frames() -> Iterator[bytes]:
        while header := stdin.read(BLOCK_HEADER.size):
            yield stdin.read(BLOCK_HEADER.unpack(header)[0])

    inputs = frames()
    # The processes are the parallelism: one encoder thread each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        encode = BlockEncoder(next(inputs))
    except StopIteration:  # the command ended before it sent the tokenizer
        return
    except NoodleError as exc:  # a bug: the command checked the tokenizer
        sys.exit(str(exc))
    for data in inputs:
        ids, replaced, blank = encode(data)
        stdout.write(RESULT_HEADER.pack(len(ids), replaced, blank))
        stdout.write(ids)
        stdout.flush()

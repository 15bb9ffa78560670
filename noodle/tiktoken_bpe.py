"""Blocks of corpus lines encoded by tiktoken, for the bundled GPT-NeoX tokenizer.

tiktoken's encoder does the work of the tokenizers library's byte-level BPE in a third to
a fifth of the CPU time (benchmarks/RESULTS.md), which is what tokenizing a large corpus
costs. It merges any adjacent pair whose joined bytes are a token, the lowest id first,
where tokenizers applies its merge rules in order. For a vocabulary that BPE training made
those give the same tokens, but a tokenizer.json can hold tokens or rules for which they
do not (a token no rule makes, a rule out of order), and no cheap check tells them apart:
tiktoken is used for the bundled tokenizer alone, whose ids it reproduces on every corpus
compared (RESULTS.md: the whole Gutenberg text; tests/test_tiktoken_bpe.py). Around the
model, tokenizers' steps are taken in its order, with its own normalizer: the special
tokens cut the raw text, NFC normalizes the rest, the added tokens of space runs cut it
(leftmost, longest first), and each piece is split by the byte-level pattern and merged.

Each line of a corpus is encoded on its own, yet a block of lines is handed to tiktoken
whole: a call per line costs as much again as the encoding of an average line. The
block's pattern (`BLOCK_PATTERN`) cuts after every newline, so no piece spans two lines
and each line's pieces are those of the line alone (see the pattern). None of the steps
around the model reaches across a newline either: no special or added token holds one,
and NFC composes no character with a newline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata

from tokenizers import normalizers

from noodle.interruptible import read_all
from noodle.tokenizer import packaged_tokenizer_path

try:
    import tiktoken
except ImportError:  # an optional speed-up: tokenizers encodes alone without it
    tiktoken = None

# The regular expression of tokenizers' ByteLevel pre-tokenizer (use_regex), GPT-2's, is
# these alternatives for words, numbers and punctuation, then these for whitespace.
WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
WHITESPACE = r"\s+(?!\S)|\s+"
# The pieces that pattern, WORDS|WHITESPACE, makes of each line of a block alone. Only the
# whitespace alternatives can reach across a newline, and at the end of a line, where the
# line's string ends, `\s+(?!\S)` takes all of the line's trailing whitespace, newline
# included; the inserted alternative takes that, and is tried only where the alternatives
# before it failed, as they fail there on a line of its own (placed first, it made tiktoken
# 5-10% slower). Elsewhere a whitespace run is followed by a non-space on its own line, so
# the later alternatives match what they match in the line alone.
BLOCK_PATTERN = rf"{WORDS}|[^\S\n]*\n|{WHITESPACE}"


@functools.cache
def byte_of_character() -> dict[str, int]:
    """The byte each character of a byte-level vocabulary stands for (GPT-2's table:
    printable bytes are themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    shifted = [byte for byte in range(256) if byte not in printable]
    table = {chr(byte): byte for byte in printable}
    table.update({chr(256 + index): byte for index, byte in enumerate(shifted)})
    return table


def alternation(tokens: list[str]) -> re.Pattern | None:
    """A pattern that cuts text at `tokens`, keeping them (leftmost, longest first)."""
    if not tokens:
        return None
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, ordered)) + ")")


class TiktokenText:
    """The ids of each line of a text encoded on its own, as tokenizers' batch encoder
    gives them, concatenated (see module doc)."""

    def __init__(self, spec: dict) -> None:
        table = byte_of_character()
        added = {token["content"]: token for token in spec.get("added_tokens") or []}
        added_ids = {token["id"] for token in added.values()}
        self.vocab_size = max([*spec["model"]["vocab"].values(), *added_ids]) + 1
        ranks = {
            bytes(table[character] for character in token): index
            for token, index in spec["model"]["vocab"].items()
            if index not in added_ids
        }
        self.encode_piece = tiktoken.Encoding(
            "noodle", pat_str=BLOCK_PATTERN, mergeable_ranks=ranks, special_tokens={}
        ).encode_ordinary
        self.ids = {content: token["id"] for content, token in added.items()}
        raw = [content for content, token in added.items() if not token["normalized"]]
        normalized = [content for content, token in added.items() if token["normalized"]]
        self.raw_cut, self.normalized_cut = alternation(raw), alternation(normalized)
        # tokenizers' own NFC: Python's unicodedata may know a later Unicode version.
        self.nfc = normalizers.NFC().normalize_str if spec.get("normalizer") else None
        # An ASCII text in which no added token's first two characters appear needs no
        # cutting ("<|" or two spaces for GPT-NeoX's).
        beginnings = alternation(list({content[:2] for content in added}))
        self.may_cut = beginnings.search if beginnings else None

    def __call__(self, text: str) -> list[int]:
        if text.isascii() and not (self.may_cut and self.may_cut(text)):
            return self.encode_piece(text)
        ids: list[int] = []
        for index, part in enumerate(self.raw_cut.split(text) if self.raw_cut else [text]):
            if index % 2:
                ids.append(self.ids[part])
                continue
            part = self.normalize(part)
            pieces = self.normalized_cut.split(part) if self.normalized_cut else [part]
            for position, piece in enumerate(pieces):
                if position % 2:
                    ids.append(self.ids[piece])
                elif piece:
                    ids.extend(self.encode_piece(piece))
        return ids

    def normalize(self, text: str) -> str:
        """tokenizers' NFC of `text`. Python's own check comes first, at a tenth of the
        cost: what it finds normalized, tokenizers leaves alone, because Python's Unicode
        version is the later one (a test checks every code point): normalization is stable
        across versions for the characters both know, and a character only the later one
        knows is, to the earlier tables, a starter that nothing composes with, which can
        only keep them from changing the text."""
        if not self.nfc or text.isascii() or unicodedata.is_normalized("NFC", text):
            return text
        return self.nfc(text)


@functools.cache
def bundled_sha256() -> str:
    return hashlib.sha256(read_all(packaged_tokenizer_path())).hexdigest()


def uses_tiktoken(sha256: str) -> bool:
    """Whether tiktoken encodes the tokenizer.json whose SHA-256 is `sha256`: the bundled
    tokenizer, where tiktoken is installed."""
    return tiktoken is not None and sha256 == bundled_sha256()


def tiktoken_for_json(tokenizer_json: bytes, sha256: str | None = None) -> TiktokenText | None:
    """tiktoken's encoder of blocks of lines for a tokenizer.json (whose SHA-256 is
    `sha256`, where known), built without the tokenizer; None where it `uses_tiktoken` not."""
    if not uses_tiktoken(sha256 or hashlib.sha256(tokenizer_json).hexdigest()):
        return None
    return bundled_text(tokenizer_json)


@functools.lru_cache(maxsize=1)
def bundled_text(tokenizer_json: bytes) -> TiktokenText:
    return TiktokenText(json.loads(tokenizer_json))

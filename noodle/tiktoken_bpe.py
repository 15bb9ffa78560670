"""Corpus lines encoded by tiktoken, for the byte-level BPE tokenizers it reproduces.

tiktoken's encoder does the work of the tokenizers library's byte-level BPE in a third to
a fifth of the CPU time (benchmarks/RESULTS.md), which is what tokenizing a large corpus
costs. It merges the pair whose token has the lowest id, where tokenizers applies its merge
rules in order: the same merges when every rule makes a token of a higher id than the rules
before it, as BPE training numbers them (checked here, with the rest of what tiktoken can
reproduce). Around the model, tokenizers' steps are taken in its order: special tokens cut
the raw text, NFC normalizes the rest, the other added tokens cut it (leftmost, longest
first), and each piece is split by the byte-level pattern and merged. The ids agree with
tokenizers' on every corpus compared (RESULTS.md and tests/test_tiktoken_bpe.py); the token
cache keys name the encoder anyway.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Callable

try:
    import tiktoken
except ImportError:  # an optional speed-up: tokenizers encodes alone without it
    tiktoken = None

LineEncoder = Callable[[list[str]], list[list[int]]]
# The regular expression of tokenizers' ByteLevel pre-tokenizer (use_regex), GPT-2's.
BYTE_LEVEL_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
NEVER_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
BPE_SETTINGS_REPRODUCED = {
    "dropout": (None,),
    "unk_token": (None,),
    "continuing_subword_prefix": (None, ""),
    "end_of_word_suffix": (None, ""),
    "byte_fallback": (False,),
    "ignore_merges": (None, False),
}


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


def reproducible(spec: dict) -> bool:
    """Whether tiktoken gives this tokenizer.json's ids: a byte-level BPE whose merges make
    tokens in increasing id order, normalized by NFC or not at all, with added tokens that
    match plain substrings."""
    model, pre_tokenizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    if model.get("type") != "BPE" or any(
        model.get(key) not in allowed for key, allowed in BPE_SETTINGS_REPRODUCED.items()
    ):
        return False
    if any(pre_tokenizer.get(key) != value for key, value in byte_level.items()):
        return False
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        return False
    added = spec.get("added_tokens") or []
    if any(token[flag] for token in added for flag in ("single_word", "lstrip", "rstrip")):
        return False
    vocab, table = model.get("vocab") or {}, byte_of_character()
    # Every byte that UTF-8 text can hold must be a token (tiktoken has no unknown token).
    needed = {character for character, byte in table.items() if byte not in NEVER_IN_UTF8}
    if not needed <= vocab.keys() or not set("".join(vocab)) <= table.keys():
        return False
    last = -1
    for merge in model.get("merges") or []:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        made = vocab.get(left + right)
        if made is None or made <= last:
            return False
        last = made
    return True


def alternation(tokens: list[str]) -> re.Pattern | None:
    """A pattern that cuts text at `tokens`, keeping them (leftmost, longest first)."""
    if not tokens:
        return None
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, ordered)) + ")")


class TiktokenLines:
    """Encodes each line on its own, as tokenizers' batch encoder does (see module doc)."""

    def __init__(self, spec: dict) -> None:
        table = byte_of_character()
        added = {token["content"]: token for token in spec.get("added_tokens") or []}
        ranks = {
            bytes(table[character] for character in token): index
            for token, index in spec["model"]["vocab"].items()
            if token not in added
        }
        self.encode_piece = tiktoken.Encoding(
            "noodle", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens={}
        ).encode_ordinary
        self.ids = {content: token["id"] for content, token in added.items()}
        raw = [content for content, token in added.items() if not token["normalized"]]
        normalized = [content for content, token in added.items() if token["normalized"]]
        self.raw_cut, self.normalized_cut = alternation(raw), alternation(normalized)
        self.nfc = spec.get("normalizer") is not None
        # An ASCII line in which no added token's first two characters appear needs no
        # cutting ("<|" or two spaces for GPT-NeoX's).
        beginnings = alternation(list({content[:2] for content in added}))
        self.may_cut = beginnings.search if beginnings else None

    def __call__(self, lines: list[str]) -> list[list[int]]:
        return [self.line(line) for line in lines]

    def line(self, line: str) -> list[int]:
        plain = line.isascii() or not self.nfc
        if plain and not (self.may_cut and self.may_cut(line)):
            return self.encode_piece(line)
        ids: list[int] = []
        for index, part in enumerate(self.raw_cut.split(line) if self.raw_cut else [line]):
            if index % 2:
                ids.append(self.ids[part])
                continue
            if self.nfc and not part.isascii():
                part = unicodedata.normalize("NFC", part)
            pieces = self.normalized_cut.split(part) if self.normalized_cut else [part]
            for position, piece in enumerate(pieces):
                if position % 2:
                    ids.append(self.ids[piece])
                elif piece:
                    ids.extend(self.encode_piece(piece))
        return ids


@functools.lru_cache(maxsize=4)
def tiktoken_lines(tokenizer_json: bytes) -> LineEncoder | None:
    """tiktoken's line encoder for this tokenizer.json, or None where tiktoken is not
    installed or cannot reproduce it."""
    if tiktoken is None:
        return None
    spec = json.loads(tokenizer_json)
    return TiktokenLines(spec) if reproducible(spec) else None

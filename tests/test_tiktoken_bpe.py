"""tiktoken's encoder gives the tokenizers library's ids, line by line, wherever it is used."""

from __future__ import annotations

import itertools
import json
import random
import unicodedata

import pytest

from noodle.corpus import cache_key
from noodle.tiktoken_bpe import bundled_text, tiktoken_for_json
from noodle.tokenizer import TextTokenizer, learn_tokenizer, load_tokenizer
from tests.stories import story_corpus

SPACE_RUNS = [" " * count for count in range(1, 60)]
EDGE_TEXTS = [
    *(run + "\n" for run in SPACE_RUNS),
    *(f"a{run}b{run}\n" for run in SPACE_RUNS),
    *(f"{run}indented, then trailing{run}" for run in SPACE_RUNS[:30]),
    "<|endoftext|>",
    "end.<|endoftext|>Start  <|endoftext|>   <|padding|>\n",
    "<|endoftext|><|endoftext|>  \n",
    "<|endoftext",
    "|>  <|",
    "not a special: <|endoftext |>\n",
    "e\u0301 and e\u0301\u0301, A\u030a, \uac00\u11a8 (decomposed, NFC composes them)\n",
    "café déjà vu\r\n",
    "日本語のテキスト、そして絵文字 🍜🍥!\n",
    "ß ẞ ﬁ Ω ≠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n",
    "don't I'LL we've they'd it's 'tis\n",
    "tabs\tand\t\ttabs \t mixed\x0b\x0c\n",
    "no-break\u00a0space, ideographic\u3000space,\u2009thin\n",
    "numbers 3.14159 1,000,000 2026-12-02 0x7f\n",
    "\n",
    "\r\n",
    "",
    "   ",
    "\x00 control \x1f characters \x7f\n",
    "\ufffd replaced\n",
]
# Every line of a block but its last ends with a newline.
EDGE_LINES = [text if text.endswith("\n") else text + "\n" for text in EDGE_TEXTS]
# A block's lines are encoded joined, as if each were alone: around each newline,
# whitespace on either side, or none.
LINE_ENDS = [
    "word\n",
    "next\n",
    "trailing space \n",
    "after\n",
    "trailing tab\t\n",
    "x\n",
    "\n",
    "\n",
    "  indented\n",
    "\tTab\n",
    "\r\n",
    "nbsp\u00a0\n",
    "\u3000ideographic\n",
    "\x1cseparator\n",
    "\u2028line separator\n",
    "<|endoftext|>\n",
    " one space\n",
    "no newline at the end  ",
]


def random_lines(count: int, seed: int) -> list[str]:
    """Lines of words, punctuation, runs of spaces, specials and non-ASCII text."""
    rng = random.Random(seed)
    parts = [
        "the",
        "Noodle",
        "ramen",
        "é",
        "e\u0301",
        "日本",
        "🍜",
        "42",
        "'s",
        ",",
        ".",
        "!?",
        " ",
        "  ",
        "    ",
        "\t",
        "<|endoftext|>",
        "<|padding|>",
        "\u00a0",
        "x" * 30,
    ]
    return ["".join(rng.choices(parts, k=rng.randint(0, 40))) + "\n" for _ in range(count)]


def reference(tokenizer: TextTokenizer, lines: list[str]) -> list[int]:
    """tokenizers' ids of the lines, each encoded on its own, concatenated."""
    encodings = tokenizer.backend.encode_batch_fast(lines, add_special_tokens=False)
    return [token for encoding in encodings for token in encoding.ids]


@pytest.fixture(scope="module")
def bundled() -> TextTokenizer:
    return load_tokenizer()


def test_the_bundled_tokenizer_is_encoded_by_tiktoken_with_its_own_ids(bundled):
    encode = tiktoken_for_json(bundled.raw)
    assert encode is not None
    stories = story_corpus(500).splitlines(keepends=True)
    lines = [*EDGE_LINES, *stories, *random_lines(800, 0), *LINE_ENDS]
    expected = reference(bundled, lines)
    assert encode("".join(lines)) == expected
    # The added tokens of space runs and the specials are really in play.
    assert {0, 1, 50254, 50276} <= set(expected)
    for line_ends in itertools.permutations(LINE_ENDS, 3):
        if LINE_ENDS[-1] in line_ends[:-1]:
            continue  # has no newline: only a block's last line
        assert encode("".join(line_ends)) == reference(bundled, list(line_ends))
    for line in EDGE_LINES:  # and each line alone, as a block of one line
        assert encode(line) == reference(bundled, [line])


def test_the_tokenizer_processes_size_token_ids_as_the_tokenizers_library_does(bundled):
    """Where tiktoken encodes, a tokenizer process does not build the tokenizer: its id
    width comes from tiktoken's encoder, the command's from tokenizers."""
    assert tiktoken_for_json(bundled.raw).vocab_size == bundled.vocab_size


def test_combining_marks_are_composed_by_the_tokenizers_own_nfc(bundled):
    """Python's unicodedata may know a later Unicode version than tokenizers' NFC: marks
    it gives a combining class are reordered by one and not the other."""
    encode = tiktoken_for_json(bundled.raw)
    marks = [*range(0x300, 0x370), *range(0x890, 0x8FF), *range(0x1AB0, 0x1B00)]
    marks += [*range(0x1DC0, 0x1E00), *range(0x20D0, 0x2100), 0xC3C, 0x1E08F]
    lines = [f"a{chr(mark)}\u0323{chr(mark)}\u0301\n" for mark in marks]
    lines += ["a\u1dfa\u0323\n", "\u0628\u0650\u08d3\u0650\n"]
    assert encode("".join(lines)) == reference(bundled, lines)


def test_what_python_finds_normalized_the_tokenizers_nfc_leaves_alone():
    """The encoder skips tokenizers' NFC where Python's quick check finds text in NFC:
    whatever Python's Unicode version, for every code point alone, after a letter, and
    before two marks that NFC reorders and composes."""
    nfc = bundled_text(load_tokenizer().raw).nfc
    # Not surrogates (no text), nor the newline that joins the texts into one call.
    characters = [chr(code) for code in range(0x110000) if not 0xD800 <= code < 0xE000]
    characters.remove("\n")
    for template in ("{}", "a{}", "a{}\u0323\u0301"):
        texts = (template.format(character) for character in characters)
        normalized = "\n".join(t for t in texts if unicodedata.is_normalized("NFC", t))
        assert nfc(normalized) == normalized


def test_other_tokenizers_are_left_to_the_tokenizers_library(bundled):
    """tiktoken merges any pair whose bytes are a token; a tokenizer.json other than the
    bundled one may hold a token no merge rule makes, where tokenizers would not."""
    learned = learn_tokenizer(story_corpus(400).splitlines(keepends=True), 600)
    assert tiktoken_for_json(learned.raw) is None
    spec = json.loads(bundled.raw)
    spec["model"]["vocab"]["Ġqzxv"] = len(spec["model"]["vocab"])
    assert tiktoken_for_json(json.dumps(spec).encode()) is None
    assert tiktoken_for_json(bundled.raw + b" ") is None


def test_the_token_cache_records_the_encoder(bundled, monkeypatch):
    source = {"path": "corpus.txt", "size": 10, "mtime_ns": 1}
    fast = cache_key(source, bundled)
    monkeypatch.setattr("noodle.corpus.uses_tiktoken", lambda sha256: False)
    assert cache_key(source, bundled) != fast


def test_without_tiktoken_the_tokenizers_library_encodes_alone(bundled, monkeypatch):
    monkeypatch.setattr("noodle.tiktoken_bpe.tiktoken", None)
    assert tiktoken_for_json(bundled.raw) is None

"""A corpus's token stream: tokenizing a source (see `sources`) as it streams in, and the
token cache.

Every source is streamed in blocks cut at line boundaries; each line (newline kept) is
tokenized on its own with the tokenizer's parallel batch API, and the ids go straight to a
flat uint16/uint32 file that training memory-maps. Memory is bounded by a few blocks in
flight, never by the corpus.

Reading, encoding and writing overlap: a thread reads and decodes the next blocks (for a
URL, the download keeps going while we tokenize), a second one runs the Rust encoder with
the GIL released, and the caller's thread turns encodings into ids and writes them.

Token files are cached in `$XDG_CACHE_HOME/noodle` under a key made of the source's
identity (resolved path + size + mtime; URL + ETag/Last-Modified + length) and the
tokenizer's hash. Sources without an identity (standard input, a URL whose server sends
no validator) and `--no-cache` runs tokenize into an unnamed temporary file in the same
directory, gone when the run ends.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import queue
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

import numpy as np

from noodle.decoding import as_text
from noodle.errors import NoodleError
from noodle.files import atomic_write
from noodle.progress import Reporter
from noodle.sources import OpenedSource, parse_source
from noodle.tokenizer import TextTokenizer

# Encodings take about 25 times the memory of their text, and three blocks are in flight.
# What the threads freed mostly stays in their glibc arenas for the rest of the run: after
# tokenizing 120 MB, RSS was 321 MB with 512 KiB blocks, 358 MB with 1 MiB, 304 MB with
# 256 KiB (262 MB before). Smaller blocks are slower (TinyStories sample, 2 cores: 256 KiB
# 80%, 512 KiB 85%, 1 MiB 88-91% of the speed of encode_batch over all lines at once).
BLOCK_BYTES = 1 << 19
# A line longer than this is cut between two words (see `cut_point`) so memory stays bounded
# even for text without newlines.
MAX_LINE_BYTES = 1 << 20
# Part of every cache key: bump it when the token stream of the same text changes.
CACHE_FORMAT = 1
REPLACEMENT = "\ufffd"
ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"

Item = TypeVar("Item")


class TextBlock(NamedTuple):
    nbytes: int  # bytes read from the source for this block (for progress)
    lines: list[str]  # each with its newline, except a last line that has none
    replaced: int  # invalid UTF-8 sequences replaced with U+FFFD
    blank: bool  # nothing but whitespace


def decode_lines(data: bytes) -> tuple[list[str], int, bool]:
    """Lines of `data`, each with its newline, the count of invalid UTF-8 sequences, and
    whether `data` is nothing but (ASCII) whitespace."""
    try:
        text, replaced = data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        replaced = text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))
    lines = text.split("\n")
    last = lines.pop()
    lines = [line + "\n" for line in lines]
    if last:
        lines.append(last)
    return lines, replaced, not data or data.isspace()


def cut_point(data: bytes, max_line_bytes: int) -> int:
    """How much of `data` forms whole lines: up to its last newline, or 0 to wait for more.

    A line longer than `max_line_bytes` is cut before a space that sits between two
    non-space bytes. The tokenizer's pre-tokenizer starts a new piece at such a space anyway
    (" word"), so the ids stay the same; runs of spaces are never split because the
    tokenizer has tokens for them. Without such a space, the cut falls between two
    characters and only the tokens around it may differ.
    """
    cut = data.rfind(b"\n") + 1
    if cut or len(data) < max_line_bytes:
        return cut
    space = len(data) - 1
    while (space := data.rfind(b" ", 1, space)) > 0:
        if data[space - 1] not in ASCII_WHITESPACE and data[space + 1] not in ASCII_WHITESPACE:
            return space
    cut = len(data) - 1
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: not a start
        cut -= 1
    return cut or len(data)  # no character start at all: invalid bytes, cut anywhere


def text_blocks(
    stream: BinaryIO, block_bytes: int = BLOCK_BYTES, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[TextBlock]:
    """The stream's text in blocks of about `block_bytes`, cut at line boundaries."""
    pending = b""
    while chunk := stream.read(block_bytes):
        data = pending + chunk
        cut = cut_point(data, max_line_bytes)
        pending = data[cut:]
        yield TextBlock(len(chunk), *decode_lines(data[:cut]))
    if pending:
        yield TextBlock(0, *decode_lines(pending))


def prefetch(items: Iterable[Item], depth: int = 2) -> Iterator[Item]:
    """Yield `items` produced ahead by a background thread, at most `depth` waiting.

    Producing the next item overlaps with consuming this one; an error in the producer is
    raised here. When the consumer stops early the producer stops too.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()
    done = object()

    def offer(entry: tuple[bool, object]) -> bool:
        while not stopped.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((True, item)):
                    return
            offer((True, done))
        except BaseException as exc:
            offer((False, exc))

    threading.Thread(target=produce, daemon=True, name="noodle-prefetch").start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stopped.set()


def encode_blocks(
    blocks: Iterable[TextBlock], tokenizer: TextTokenizer
) -> Iterator[tuple[TextBlock, list]]:
    # The offset-free batch encoder: Noodle needs only the ids, and offsets cost ~10%.
    encode = tokenizer.backend.encode_batch_fast
    for block in blocks:
        yield block, encode(block.lines, add_special_tokens=False)


def flatten_ids(encodings: list, dtype: np.dtype) -> np.ndarray:
    """All ids of `encodings` as one array, built in one pass instead of one array per line."""
    ids = [encoding.ids for encoding in encodings]
    count = sum(map(len, ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=count)


def tokenize_blocks(
    stream: BinaryIO, tokenizer: TextTokenizer, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[TextBlock, np.ndarray]]:
    """Each block of the stream with its token ids, read and encoded ahead in threads."""
    dtype = token_dtype(tokenizer.vocab_size)
    blocks = prefetch(text_blocks(stream, block_bytes))
    for block, encodings in prefetch(encode_blocks(blocks, tokenizer), depth=1):
        yield block, flatten_ids(encodings, dtype)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "noodle"


def token_dir() -> Path:
    """The cache directory, created; it also holds the unnamed files of uncached runs."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NoodleError(f"cannot create the token cache {directory}: {exc.strerror}") from None
    return directory


def warn_replaced(reporter: Reporter, name: str, replaced: int, what: str = "corpus") -> None:
    if replaced:
        reporter.warn(
            f"{what} {name}: {replaced} invalid UTF-8 byte sequence(s) replaced with U+FFFD"
        )


def tokenize_to_file(
    source: OpenedSource,
    tokenizer: TextTokenizer,
    out: BinaryIO,
    reporter: Reporter,
    block_bytes: int = BLOCK_BYTES,
) -> int:
    """Stream the text of `source` (decompressed if need be) through the tokenizer into
    `out`; returns the number of tokens. Text that is only whitespace gets a warning."""
    source = as_text(source)
    count = replaced = 0
    blank = True
    task = reporter.start_task("tokenizing", total=source.size, unit="bytes")
    for block, ids in tokenize_blocks(source.stream, tokenizer, block_bytes):
        ids.tofile(out)
        count += len(ids)
        replaced += block.replaced
        blank = blank and block.blank
        task.advance(block.nbytes, tokens=count)
    task.finish(tokens=count)
    warn_replaced(reporter, source.name, replaced)
    if count == 0:
        raise NoodleError(f"corpus {source.name} is empty")
    if blank:
        reporter.warn(
            f"corpus {source.name} holds no text, only whitespace ({count:,} tokens of spaces "
            "and line breaks): a model learns nothing from it"
        )
    out.flush()
    return count


def cache_key(identity: dict, tokenizer: TextTokenizer) -> str:
    material = {"format": CACHE_FORMAT, "source": identity, "tokenizer": tokenizer.sha256}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def load_token_stream(
    spec: str, tokenizer: TextTokenizer, reporter: Reporter, use_cache: bool = True
) -> np.ndarray:
    """The corpus as a read-only memory-mapped token array, tokenizing it on first use."""
    source = parse_source(spec)
    dtype = token_dtype(tokenizer.vocab_size)
    directory = token_dir()
    with source.open() as opened:
        if use_cache and opened.identity is not None:
            path = directory / f"{cache_key(opened.identity, tokenizer)}.{dtype.name}"
            if path.exists():
                reporter.info(f"token cache hit: {path}")
            else:
                atomic_write(path, lambda out: tokenize_to_file(opened, tokenizer, out, reporter))
                reporter.info(f"token cache: {path}")
            return np.memmap(path, dtype=dtype, mode="r")
        if use_cache:
            reporter.info(f"not caching the tokens of {opened.name}: {opened.uncached_reason}")
        # O_TMPFILE where supported: the file has no name and vanishes with the process.
        with tempfile.TemporaryFile(dir=directory) as out:
            tokenize_to_file(opened, tokenizer, out, reporter)
            return np.memmap(out, dtype=dtype, mode="r")


def token_chunks(tokens: np.ndarray, chunk_tokens: int) -> Iterator[np.ndarray]:
    """`tokens` in consecutive pieces of `chunk_tokens`, for one pass over a token stream.

    Pages of a memory-mapped token file count in the process's resident memory from the
    first read until they are unmapped, so a pass over a stream from `load_token_stream`
    would leave all of it resident (60 MB for a 120 MB corpus). Once the next piece is
    asked for, every page up to the end of this one is released (the kernel keeps them in
    its page cache): from the start, because reading a page also maps the cached pages
    around it, earlier ones included.
    """
    mapping = tokens.base if isinstance(tokens.base, mmap.mmap) else None
    can_release = mapping is not None and hasattr(mmap, "MADV_DONTNEED")
    for start in range(0, len(tokens), chunk_tokens):
        yield tokens[start : start + chunk_tokens]
        if can_release:
            mapping.madvise(mmap.MADV_DONTNEED, 0, (start + chunk_tokens) * tokens.itemsize)


def read_lines(spec: str, reporter: Reporter, what: str = "corpus") -> Iterator[str]:
    """The lines of any corpus source (newlines kept), streamed; invalid UTF-8 is replaced.
    `what` names the source in messages."""
    replaced = 0
    with parse_source(spec, what).open() as raw:
        opened = as_text(raw, what)
        for block in prefetch(text_blocks(opened.stream)):
            replaced += block.replaced
            yield from block.lines
        warn_replaced(reporter, opened.name, replaced, what)

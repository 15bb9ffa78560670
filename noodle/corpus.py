"""A corpus's token stream: tokenizing a source (see `sources`) as it streams in, and the
token cache.

Every source is streamed in blocks cut at line boundaries; each line (newline kept) is
tokenized on its own (by tiktoken for the bundled tokenizer, else by the tokenizer's batch
API), and the ids go straight to a flat uint16/uint32 file that training memory-maps.
Memory is bounded by a few blocks in flight, never by the corpus.

A large or unbounded source is tokenized by one process per core (`tokenizer_worker`): a
thread reads the next blocks (for a URL, the download keeps going while we tokenize) and
hands them to the processes, and the caller's thread writes their ids in order. In one
process the work would stop scaling at a few cores, because turning encodings into ids
holds the GIL. A small source is tokenized in this process: a thread reads and decodes, a
second one encodes (tiktoken on one core, or tokenizers' Rust encoder on all of them, GIL
released) and makes the ids, and the caller's thread writes them.

Token files are cached in `$XDG_CACHE_HOME/noodle` under a key made of the source's
identity (resolved path + size + mtime; URL + ETag/Last-Modified + length) and the
tokenizer's hash. Sources without an identity (standard input, a URL whose server sends
no validator) and `--no-cache` runs tokenize into an unnamed temporary file in the same
directory, gone when the run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, NoReturn, TypeVar

import numpy as np

from noodle.cores import available_cores
from noodle.decoding import as_text
from noodle.errors import NoodleError
from noodle.files import atomic_write
from noodle.interruptible import next_item
from noodle.memory import release_free_memory
from noodle.sources import OpenedSource, parse_source
from noodle.tiktoken_bpe import uses_tiktoken
from noodle.tokenizer import TextTokenizer
from noodle.tokenizer_worker import (
    BLOCK_HEADER,
    RESULT_HEADER,
    BlockEncoder,
    decode_text,
    split_lines,
    token_itemsize,
)

if TYPE_CHECKING:  # tokenizer processes import this module; they need no progress display
    from noodle.progress import Reporter

# Encodings take about 25 times the memory of their text: a tokenizer process holds one
# block's, the in-process path three. There, what the threads freed mostly stays in their
# glibc arenas for the rest of the run: after tokenizing 120 MB in-process, RSS was 321 MB
# with 512 KiB blocks, 358 MB with 1 MiB, 304 MB with 256 KiB (262 MB before). Smaller
# blocks are slower (TinyStories sample, 2 cores: 256 KiB 80%, 512 KiB 85%, 1 MiB 88-91% of
# the speed of encode_batch over all lines at once).
BLOCK_BYTES = 1 << 19
# A line longer than this is cut between two words (see `cut_point`) so memory stays bounded
# even for text without newlines.
MAX_LINE_BYTES = 1 << 20
# A tokenizer process costs a fifth to a third of a second of one core to start (an
# interpreter and the tokenizer; RESULTS.md): each gets at least this much text, and a
# source with less than twice this is tokenized in this process.
MIN_BYTES_PER_PROCESS = 4 << 20
# Blocks handed to the tokenizer processes and not yet written, per process: enough slack
# for the others to go on while one is slow with a block (results are written in order),
# few enough to bound memory (with 16 processes, ~50 MB of text and ids).
BLOCKS_PER_PROCESS = 4
# Part of every cache key: bump it when the token stream of the same text changes.
CACHE_FORMAT = 1
ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"

Item = TypeVar("Item")


class LineBlock(NamedTuple):
    nbytes: int  # bytes read from the source for this block (for progress)
    data: bytes  # whole lines, except at the end of the source or in an overlong line


class TextBlock(NamedTuple):
    nbytes: int
    text: str  # whole lines, each with its newline, except maybe a last one
    replaced: int  # invalid UTF-8 sequences replaced with U+FFFD
    blank: bool  # nothing but whitespace

    @property
    def lines(self) -> list[str]:
        return split_lines(self.text)


class TokenBlock(NamedTuple):
    nbytes: int
    ids: np.ndarray
    replaced: int
    blank: bool


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


def line_blocks(
    stream: BinaryIO, block_bytes: int = BLOCK_BYTES, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[LineBlock]:
    """The stream's bytes in blocks of about `block_bytes`, cut at line boundaries."""
    pending = b""
    while chunk := stream.read(block_bytes):
        data = pending + chunk
        cut = cut_point(data, max_line_bytes)
        pending = data[cut:]
        yield LineBlock(len(chunk), data[:cut])
    if pending:
        yield LineBlock(0, pending)


def text_blocks(
    stream: BinaryIO, block_bytes: int = BLOCK_BYTES, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[TextBlock]:
    """The stream's text in blocks of about `block_bytes`, cut at line boundaries."""
    for block in line_blocks(stream, block_bytes, max_line_bytes):
        yield TextBlock(block.nbytes, *decode_text(block.data))


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
            ok, item = next_item(ready)
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stopped.set()


def tokenize_in_threads(
    stream: BinaryIO, tokenizer: TextTokenizer, block_bytes: int = BLOCK_BYTES
) -> Iterator[TokenBlock]:
    """Each block of the stream with its token ids, read and encoded ahead in threads, by
    the encoder of the tokenizer processes (its own tokenizer, its tokenizers encoder on
    all cores here)."""
    encoder, dtype = BlockEncoder(tokenizer.raw), token_dtype(tokenizer.vocab_size)
    blocks = prefetch(text_blocks(stream, block_bytes))
    encoded = ((block, np.frombuffer(encoder.ids(block.text), dtype)) for block in blocks)
    for block, ids in prefetch(encoded, depth=1):
        yield TokenBlock(block.nbytes, ids, block.replaced, block.blank)


class TokenizerProcess:
    """A running `tokenizer_worker`. One thread writes its blocks and one collects its
    results, so that it never waits on the caller, who takes the results in order (and on
    its slowest process)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        command = "from noodle.tokenizer_worker import serve; serve()"
        # Read only if it fails; a file, because a pipe nobody reads could fill and stall it.
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [sys.executable, "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            env={**os.environ, "PYTHONPATH": path},
            # Out of the terminal's process group: Ctrl-C reaches the command alone, which
            # then stops its tokenizer processes.
            start_new_session=True,
        )
        self.dtype = token_dtype(tokenizer.vocab_size)
        # The tokenizer (too big for an argument, and maybe learned, with no file), then
        # the blocks; None ends the input.
        self.blocks: queue.Queue[bytes | None] = queue.Queue()
        self.blocks.put(tokenizer.raw)
        # (ids, invalid UTF-8 sequences, blank) per block; None once the output has ended.
        self.results: queue.Queue[tuple[np.ndarray, int, bool] | None] = queue.Queue()
        self.threads = [
            threading.Thread(target=self.feed, daemon=True, name="noodle-feed"),
            threading.Thread(target=self.collect, daemon=True, name="noodle-collect"),
        ]
        for thread in self.threads:
            thread.start()

    def feed(self) -> None:
        stdin = self.process.stdin
        try:
            while (data := self.blocks.get()) is not None:
                stdin.write(BLOCK_HEADER.pack(len(data)))
                stdin.write(data)
                stdin.flush()
            stdin.close()
        except OSError:  # the process ended: `receive` says why
            pass

    def collect(self) -> None:
        stdout = self.process.stdout
        with contextlib.suppress(OSError):
            while len(header := stdout.read(RESULT_HEADER.size)) == RESULT_HEADER.size:
                count, replaced, blank = RESULT_HEADER.unpack(header)
                data = stdout.read(count * self.dtype.itemsize)
                if len(data) < count * self.dtype.itemsize:
                    break
                self.results.put((np.frombuffer(data, self.dtype), replaced, blank))
        self.results.put(None)

    def send(self, data: bytes) -> None:
        self.blocks.put(data)

    def receive(self) -> tuple[np.ndarray, int, bool]:
        """The ids of the oldest block sent and not yet received, its invalid UTF-8
        sequences and its blankness."""
        result = next_item(self.results)
        if result is None:
            self.fail()
        return result

    def fail(self) -> NoReturn:
        code = self.process.wait()
        self.errors.seek(0)
        reason = self.errors.read().decode(errors="replace").strip().splitlines()
        raise NoodleError(
            f"a tokenizer process ended unexpectedly (exit code {code})"
            + (f": {reason[-1]}" if reason else "")
        )

    def finish(self) -> None:
        """End the input and wait for the process to exit."""
        self.blocks.put(None)
        self.process.wait()

    def stop(self) -> None:
        """End the process now (a no-op once it has exited) and free its pipes."""
        self.blocks.put(None)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for thread in self.threads:
            thread.join()
        for file in (self.process.stdin, self.process.stdout, self.errors):
            with contextlib.suppress(OSError):
                file.close()


def tokenize_in_processes(
    stream: BinaryIO, tokenizer: TextTokenizer, processes: int, block_bytes: int = BLOCK_BYTES
) -> Iterator[TokenBlock]:
    """Each block of the stream with its token ids, in order, encoded by `processes`
    tokenizer processes in turn; at most BLOCKS_PER_PROCESS blocks per process in flight."""
    workers: list[TokenizerProcess] = []
    try:
        workers += (TokenizerProcess(tokenizer) for _ in range(processes))
        in_flight: deque[tuple[int, TokenizerProcess]] = deque()
        for index, block in enumerate(prefetch(line_blocks(stream, block_bytes))):
            worker = workers[index % processes]
            worker.send(block.data)
            in_flight.append((block.nbytes, worker))
            if len(in_flight) == BLOCKS_PER_PROCESS * processes:
                nbytes, worker = in_flight.popleft()
                yield TokenBlock(nbytes, *worker.receive())
        while in_flight:
            nbytes, worker = in_flight.popleft()
            yield TokenBlock(nbytes, *worker.receive())
        for worker in workers:
            worker.finish()
    finally:
        for worker in workers:
            worker.stop()


def tokenizer_processes(size: int | None) -> int:
    """How many tokenizer processes a source of `size` bytes (None: unknown) gets: one per
    core, fewer for a small source, and 0 (tokenize in this process) for one process or
    less."""
    processes = available_cores()
    if size is not None:
        processes = min(processes, size // MIN_BYTES_PER_PROCESS)
    return processes if processes > 1 else 0


def token_blocks(
    stream: BinaryIO, tokenizer: TextTokenizer, processes: int, block_bytes: int = BLOCK_BYTES
) -> Iterator[TokenBlock]:
    """The stream's token ids block by block, tokenized by `processes` processes or, with 0,
    in this process."""
    if processes:
        return tokenize_in_processes(stream, tokenizer, processes, block_bytes)
    return tokenize_in_threads(stream, tokenizer, block_bytes)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(f"u{token_itemsize(vocab_size)}")


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
    processes: int | None = None,
) -> int:
    """Stream the text of `source` (decompressed if need be) through the tokenizer into
    `out`; returns the number of tokens. Text that is only whitespace gets a warning.
    `processes`: tokenizer processes (0: none, tokenize in this one); by default, see
    `tokenizer_processes`."""
    source = as_text(source)
    if processes is None:
        processes = tokenizer_processes(source.size)
    count = replaced = 0
    blank = True
    description = f"tokenizing ({processes} processes)" if processes else "tokenizing"
    task = reporter.start_task(description, total=source.size, unit="bytes")
    blocks = token_blocks(source.stream, tokenizer, processes, block_bytes)
    # Closed on any error or interruption, so the tokenizer processes stop at once.
    with contextlib.closing(blocks):
        for block in blocks:
            block.ids.tofile(out)
            count += len(block.ids)
            replaced += block.replaced
            blank = blank and block.blank
            task.advance(block.nbytes, tokens=count)
    # What the reading, feeding and encoding threads freed stays in their glibc arenas,
    # where training (on the main thread) cannot reuse it: 10-20 MB after 30 MB of text.
    release_free_memory()
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
    # The encoders agree (tiktoken_bpe), but a cache records which one wrote it.
    material["encoder"] = "tiktoken" if uses_tiktoken(tokenizer.sha256) else "tokenizers"
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


def release_token_pages(tokens: np.ndarray, end: int | None = None) -> None:
    """Unmap what reading has mapped of a memory-mapped token stream (up to token `end`);
    the kernel keeps the pages in its page cache, and a read maps them again. No-op for an
    array in memory.

    Mapped pages count in the process's resident memory until they are unmapped, and a
    read maps more than it reads: the cached pages around it too (~90 KB a window here,
    Linux 6.18). Evaluations (400 windows by default) and training read windows all over
    the corpus, so without this the whole token file would end up counted.
    """
    if isinstance(tokens.base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        length = len(tokens.base) if end is None else end * tokens.itemsize
        tokens.base.madvise(mmap.MADV_DONTNEED, 0, min(length, len(tokens.base)))


def token_chunks(tokens: np.ndarray, chunk_tokens: int) -> Iterator[np.ndarray]:
    """`tokens` in consecutive pieces of `chunk_tokens`, for one pass over a token stream.

    A pass over a stream from `load_token_stream` would leave all of it resident (60 MB for
    a 120 MB corpus, see `release_token_pages`): once the next piece is asked for, every
    page up to the end of this one is released, from the start, because reading a page also
    maps the cached pages around it, earlier ones included.
    """
    for start in range(0, len(tokens), chunk_tokens):
        yield tokens[start : start + chunk_tokens]
        release_token_pages(tokens, start + chunk_tokens)


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

"""Corpus sources and their token stream.

Text is read in blocks cut at line boundaries and tokenized line by line (each line keeps
its newline) with the tokenizer's parallel batch API. The ids go straight to a flat
uint16/uint32 file in the token cache, which training memory-maps, so memory is bounded by
one block, never by the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from noodle.errors import NoodleError
from noodle.progress import Reporter
from noodle.tokenizer import TextTokenizer

BLOCK_BYTES = 4 << 20
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class LocalFile:
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def identity(self) -> dict:
        stat = self.path.stat()
        return {
            "path": str(self.path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }

    def size(self) -> int | None:
        return self.path.stat().st_size

    def open(self) -> BinaryIO:
        return self.path.open("rb")


def open_source(spec: str) -> LocalFile:
    """Check a CORPUS argument and return the source it names."""
    path = Path(spec)
    if not path.exists():
        raise NoodleError(f"corpus {spec}: no such file")
    if path.is_dir():
        raise NoodleError(f"corpus {spec} is a directory, expected a text file")
    if not os.access(path, os.R_OK):
        raise NoodleError(f"corpus {spec}: permission denied")
    if path.stat().st_size == 0:
        raise NoodleError(f"corpus {spec} is empty")
    return LocalFile(path)


def decode_lines(data: bytes, counter: list[int]) -> list[str]:
    """Lines of `data`, each with its newline; invalid UTF-8 is replaced and counted."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        counter[0] += text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def line_blocks(stream: BinaryIO, counter: list[int], block_bytes: int = BLOCK_BYTES):
    """Yield (bytes read, lines) for blocks of about `block_bytes` cut after a newline."""
    pending = b""
    while block := stream.read(block_bytes):
        data = pending + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            pending = data
            continue
        pending = data[cut:]
        yield len(block), decode_lines(data[:cut], counter)
    if pending:
        yield 0, decode_lines(pending, counter)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "noodle"


def tokenize_to_file(
    source: LocalFile, tokenizer: TextTokenizer, out: BinaryIO, reporter: Reporter
) -> int:
    """Stream `source` through the tokenizer into `out`; returns the number of tokens."""
    dtype = token_dtype(tokenizer.vocab_size)
    invalid = [0]
    count = 0
    task = reporter.start_task("tokenizing", total=source.size(), unit="bytes")
    with source.open() as stream:
        for nbytes, lines in line_blocks(stream, invalid):
            for ids in tokenizer.encode_batch(lines):
                np.asarray(ids, dtype=dtype).tofile(out)
                count += len(ids)
            task.advance(nbytes, tokens=count)
    task.finish(tokens=count)
    if invalid[0]:
        reporter.warn(
            f"corpus {source.name}: {invalid[0]} invalid UTF-8 byte sequence(s) replaced "
            "with U+FFFD"
        )
    return count


def load_token_stream(
    spec: str, tokenizer: TextTokenizer, reporter: Reporter, use_cache: bool = True
) -> np.ndarray:
    """The corpus as a read-only memory-mapped token array, tokenizing it on first use."""
    source = open_source(spec)
    key = hashlib.sha256(
        json.dumps({"source": source.identity(), "tokenizer": tokenizer.sha256}).encode()
    ).hexdigest()[:32]
    dtype = token_dtype(tokenizer.vocab_size)
    if not use_cache:
        with tempfile.TemporaryFile() as out:
            tokenize_to_file(source, tokenizer, out, reporter)
            return memmap_tokens(out, dtype, spec)
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.{dtype.name}"
    if path.exists():
        reporter.info(f"token cache hit: {path}")
    else:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                tokenize_to_file(source, tokenizer, out, reporter)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    with path.open("rb") as handle:
        return memmap_tokens(handle, dtype, spec)


def memmap_tokens(handle: BinaryIO, dtype: np.dtype, spec: str) -> np.ndarray:
    handle.flush()
    if os.fstat(handle.fileno()).st_size == 0:
        raise NoodleError(f"corpus {spec} holds no tokens")
    return np.memmap(handle, dtype=dtype, mode="r")

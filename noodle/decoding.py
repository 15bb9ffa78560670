"""What a source's bytes hold: text, text compressed with gzip, xz, bzip2 or zstd (found by
its magic bytes, whatever the file's name, and decompressed as it streams), or binary data,
which is refused before any of it is tokenized.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Callable
from typing import BinaryIO

from noodle.errors import NoodleError
from noodle.sources import OpenedSource

# How much of the start of a stream decides what it holds.
SAMPLE_BYTES = 1 << 16
# Text in a legacy 8-bit encoding has an invalid UTF-8 sequence per accented letter, a few
# percent of its bytes; random binary data has one for most bytes.
MAX_INVALID_FRACTION = 0.25
ZSTD_HINT = "pip install zstandard, or decompress it first: zstd -d FILE"


def open_zstd(stream: BinaryIO) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise NoodleError(f"reading zstd needs the zstandard package ({ZSTD_HINT})") from None
    return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)


# Magic bytes -> (format name, the decompressing reader over a binary stream). The readers
# hold no file of their own: closing the source's stream (its `open()` context) is enough.
FORMATS: dict[bytes, tuple[str, Callable[[BinaryIO], BinaryIO]]] = {
    b"\x1f\x8b": ("gzip", lambda stream: gzip.GzipFile(fileobj=stream, mode="rb")),
    b"\xfd7zXZ\x00": ("xz", lambda stream: lzma.LZMAFile(stream)),  # noqa: SIM115
    b"BZh": ("bzip2", lambda stream: bz2.BZ2File(stream)),
    b"\x28\xb5\x2f\xfd": ("zstd", open_zstd),
}


def decompression_errors() -> tuple[type[BaseException], ...]:
    """What a decompressor raises on damaged or truncated data."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


class Prefixed:
    """A stream whose first bytes were already read (to look at them): those, then the rest."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data


class Decompressing:
    """A decompressed stream whose failures name the source and the format."""

    def __init__(self, stream: BinaryIO, source: str, format_name: str) -> None:
        self.stream, self.source, self.format_name = stream, source, format_name
        self.errors = decompression_errors()

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except self.errors as exc:
            reason = str(exc) or type(exc).__name__
            raise NoodleError(
                f"{self.source}: damaged or truncated {self.format_name} data ({reason})"
            ) from None


def read_sample(stream: BinaryIO) -> bytes:
    """Up to SAMPLE_BYTES from the start of `stream` (a pipe may hand them over in pieces)."""
    pieces, size = [], 0
    while size < SAMPLE_BYTES and (piece := stream.read(SAMPLE_BYTES - size)):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def binary_reason(sample: bytes) -> str | None:
    """Why `sample`, the start of a stream, is not text; None for text."""
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text (convert it to UTF-8 first, e.g. with iconv -f UTF-16 -t UTF-8)"
    nul = sample.find(b"\x00")
    if nul >= 0:
        return f"binary data (a NUL byte at offset {nul:,})"
    # U+FFFD characters already in the text are not invalid; one sequence more may be a
    # character cut off by the sample's end.
    invalid = sample.decode("utf-8", errors="replace").count("\ufffd") - sample.count(
        "\ufffd".encode()
    )
    if invalid > MAX_INVALID_FRACTION * len(sample) + 1:
        return (
            f"binary data ({invalid:,} invalid UTF-8 sequences in its first {len(sample):,} bytes)"
        )
    return None


def as_text(opened: OpenedSource, what: str = "corpus") -> OpenedSource:
    """`opened` with a stream of its text: decompressed if it is compressed (its size then
    unknown), refused with a clear error if it is binary. `what` names it in messages."""
    source = f"{what} {opened.name}"
    head = read_sample(opened.stream)
    stream: BinaryIO = Prefixed(head, opened.stream)
    size = opened.size
    compression = next((fmt for magic, fmt in FORMATS.items() if head.startswith(magic)), None)
    if compression is not None:
        format_name, open_decompressed = compression
        try:
            decompressed = open_decompressed(stream)
        except NoodleError as exc:
            raise NoodleError(f"{source} is {format_name}-compressed: {exc}") from None
        stream = Decompressing(decompressed, source, format_name)
        head = read_sample(stream)
        stream, size = Prefixed(head, stream), None
    reason = binary_reason(head)
    if reason:
        kind = f"{compression[0]}-compressed " if compression else ""
        raise NoodleError(
            f"{source} is not text: {kind}{reason}; give UTF-8 text, plain or compressed with "
            "gzip, xz, bzip2 or zstd"
        )
    return OpenedSource(opened.name, stream, size, opened.identity, opened.uncached_reason)

"""Where a corpus comes from: a local file, standard input (or another pipe or device), an
http(s):// URL or hf://owner/repo/path (a file of a Hugging Face dataset), opened as a byte
stream with what is known about it up front (name, size, and an identity for the token cache).
"""

from __future__ import annotations

import http.client
import os
import re
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn

from noodle import __version__
from noodle.errors import NoodleError, UsageError

HTTP_TIMEOUT_S = 30.0
HF_FORM = "hf://owner/repo/path/to/file"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
SUPPORTED = f"a local path, - for standard input, an http:// or https:// URL, or {HF_FORM}"
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass
class OpenedSource:
    """A source being read: its byte stream and what is known about it up front."""

    name: str
    stream: BinaryIO
    size: int | None
    # What the cache key is made of; None when the content cannot be identified.
    identity: dict | None
    uncached_reason: str | None = None


@dataclass(frozen=True)
class LocalFile:
    path: Path

    @contextmanager
    def open(self) -> Iterator[OpenedSource]:
        with self.path.open("rb") as stream:
            stat = os.fstat(stream.fileno())
            identity = {
                "path": str(self.path.resolve()),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
            yield OpenedSource(str(self.path), stream, stat.st_size, identity)


class StandardInput:
    @contextmanager
    def open(self) -> Iterator[OpenedSource]:
        # A reader of its own, never closed: when Ctrl-C stops a command while a thread is
        # blocked reading it, Python's shutdown (which closes sys.stdin) would abort waiting
        # for that reader's lock.
        stream = open(sys.stdin.fileno(), "rb", closefd=False)  # noqa: SIM115
        yield OpenedSource(
            "- (standard input)",
            stream,
            size=None,
            identity=None,
            uncached_reason="standard input is never cached",
        )


@dataclass(frozen=True)
class LocalStream:
    """A readable path that is not a regular file (a named pipe, /dev/stdin, a process
    substitution such as <(zcat corpus.gz), a device): read once, as standard input is."""

    path: Path

    @contextmanager
    def open(self) -> Iterator[OpenedSource]:
        with self.path.open("rb") as stream:
            yield OpenedSource(
                str(self.path),
                stream,
                size=None,
                identity=None,
                uncached_reason="a pipe or device is read once and never cached",
            )


class SameHostAuthRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, sending the Authorization header to the same host only.

    Hugging Face answers a download with a redirect to a signed CDN URL: the token must not
    leak there, and signed URLs reject requests that carry a second credential.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        old_host = urllib.parse.urlsplit(req.full_url).netloc
        if redirected is not None and urllib.parse.urlsplit(newurl).netloc != old_host:
            redirected.remove_header("Authorization")
        return redirected


class ResponseReader:
    """A response body whose read failures name the URL.

    `read(n)` of http.client returns what it got when the connection ends early, so a body
    shorter than its Content-Length is caught here.
    """

    def __init__(
        self, response: http.client.HTTPResponse, description: str, size: int | None
    ) -> None:
        self.response, self.description, self.size = response, description, size
        self.received = 0

    def read(self, size: int) -> bytes:
        try:
            data = self.response.read(size)
        except (OSError, http.client.HTTPException) as exc:
            self.fail(failure_reason(exc))
        if not data and self.size is not None and self.received < self.size:
            self.fail(f"the connection closed before the end of the file ({self.size:,} bytes)")
        self.received += len(data)
        return data

    def fail(self, reason: str) -> NoReturn:
        raise NoodleError(
            f"download of {self.description} failed after {self.received:,} bytes: {reason}"
        ) from None


def failure_reason(exc: BaseException) -> str:
    """Why a request failed, in a few words: "Connection refused", "timed out", ..."""
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return str(exc.reason)
        exc = exc.reason
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


@dataclass(frozen=True)
class WebFile:
    """An http(s) URL; `name` is what the user typed (the URL itself, or an hf:// spec)."""

    url: str
    name: str
    token: str | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        return self.url if self.name == self.url else f"{self.name} ({self.url})"

    @contextmanager
    def open(self) -> Iterator[OpenedSource]:
        request = urllib.request.Request(self.url, headers={"User-Agent": f"noodle/{__version__}"})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        opener = urllib.request.build_opener(SameHostAuthRedirects)
        try:
            response = opener.open(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise NoodleError(
                f"cannot download {self.description}: HTTP {exc.code} {exc.reason}"
                f"{self.status_hint(exc.code)}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise NoodleError(f"cannot reach {self.description}: {failure_reason(exc)}") from None
        with response:
            headers = response.headers
            length = headers.get("Content-Length", "")
            # A compressed body's length says nothing about the text it holds.
            size = int(length) if length.isdigit() and not headers.get("Content-Encoding") else None
            validators = {
                "etag": headers.get("ETag"),
                "last_modified": headers.get("Last-Modified"),
            }
            identity = None
            if any(validators.values()):
                identity = {"url": self.url, **validators, "length": size}
            yield OpenedSource(
                self.name,
                ResponseReader(response, self.description, size),
                size,
                identity,
                uncached_reason="the server sends no ETag or Last-Modified to identify it",
            )

    def status_hint(self, status: int) -> str:
        if not self.name.startswith("hf://"):
            return ""
        if status in (401, 403):
            return " (a private or gated dataset: set HF_TOKEN to a token with access)"
        if status == 404:
            return f" (check the owner, repository and file path: {HF_FORM})"
        return ""


Source = LocalFile | StandardInput | LocalStream | WebFile


def hf_url(spec: str) -> str:
    """The download URL of hf://owner/repo/path/to/file, a file of a Hugging Face dataset."""
    parts = spec.split("://", 1)[1].split("/")
    # `datasets` is a reserved name on the Hub (no owner has it), so the
    # hf://datasets/owner/repo/path form of huggingface_hub's file system is unambiguous.
    if parts[0] == "datasets":
        parts = parts[1:]
    if len(parts) < 3 or not all(parts):
        raise UsageError(
            f"invalid Hugging Face corpus {spec!r}: expected {HF_FORM} "
            "(a file of a dataset repository)"
        )
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT).rstrip("/")
    owner, repo, *path = (urllib.parse.quote(part, safe="") for part in parts)
    return f"{endpoint}/datasets/{owner}/{repo}/resolve/main/{'/'.join(path)}"


def check_url(spec: str, what: str) -> None:
    """Refuse an http(s) URL that cannot be requested at all (e.g. `http://[::1/x`)."""
    try:
        parts = urllib.parse.urlsplit(spec)
        parts.port  # noqa: B018  (parsing the port is what checks it)
    except ValueError as exc:
        raise UsageError(f"{what} {spec}: invalid URL ({exc})") from None
    if not parts.hostname:
        raise UsageError(f"{what} {spec}: invalid URL (no host)")


def parse_source(spec: str, what: str = "corpus") -> Source:
    """Check a CORPUS argument and return the source it names; `what` names the argument
    in error messages (e.g. "instruction file")."""
    if spec == "-":
        return StandardInput()
    scheme = SCHEME.match(spec)
    if scheme:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            check_url(spec, what)
            return WebFile(spec, spec)
        if name == "hf":
            return WebFile(hf_url(spec), spec, token=os.environ.get("HF_TOKEN") or None)
        raise UsageError(f"{what} {spec}: {name}:// is not supported (give {SUPPORTED})")
    path = Path(spec)
    if not path.exists():
        raise NoodleError(f"{what} {spec}: no such file")
    if path.is_dir():
        raise NoodleError(f"{what} {spec} is a directory, expected a text file")
    if not os.access(path, os.R_OK):
        raise NoodleError(f"{what} {spec}: permission denied")
    status = path.stat()
    if not stat.S_ISREG(status.st_mode):
        return LocalStream(path)
    if status.st_size == 0:
        raise NoodleError(f"{what} {spec} is empty")
    return LocalFile(path)

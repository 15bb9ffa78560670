"""Corpus sources (local file, stdin, http(s)://, hf://), parallel tokenization and the cache.

HTTP sources are served by a real server on 127.0.0.1 started by the tests.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from tokenizers import normalizers

from noodle import sources
from noodle.cores import available_cores
from noodle.corpus import (
    load_token_stream,
    read_lines,
    text_blocks,
    token_blocks,
    token_chunks,
    tokenize_to_file,
)
from noodle.errors import NoodleError, UsageError
from noodle.progress import Reporter
from noodle.sources import LocalFile, WebFile, hf_url
from noodle.tiktoken_bpe import tiktoken_for_json
from noodle.tokenizer import TextTokenizer, load_tokenizer
from noodle.tokenizer_worker import BlockEncoder
from tests.conftest import noodle_command, noodle_env, run_noodle, story_corpus

# Multi-byte characters, CRLF line ends, blank lines, the end-of-text marker, a line of
# only spaces, and a last line without a newline.
TRICKY_TEXT = (
    "Once upon a time, café déjà vu.\r\n"
    "日本語のテキスト、そして絵文字 🍜🍥!\n"
    "\n"
    "\r\n"
    "<|endoftext|>\n"
    "    indented    with   runs of spaces\n"
    "ß ẞ ﬁ Ω ≠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301 (a combining accent)\r\n"
    "the end"
)


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    """A token cache of this test's own, so its files can be counted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "noodle"


def cached_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.uint*")) if directory.exists() else []


def reference_ids(tokenizer, text: str) -> list[int]:
    """The sequential reference: every line (with its newline) encoded on its own."""
    *lines, last = text.split("\n")
    ids = [i for line in lines for i in tokenizer.encode(line + "\n")]
    return ids + (tokenizer.encode(last) if last else [])


@pytest.mark.parametrize(
    ("processes", "block_sizes", "encoder"),
    [
        (0, (7, 100, 1 << 20), "tiktoken"),
        (0, (100,), "tokenizers"),
        (2, (64,), "tiktoken"),
        (2, (64,), "tokenizers"),
    ],
    ids=["threads", "threads-tokenizers", "2", "2-tokenizers"],
)
def test_parallel_tokenization_matches_the_sequential_reference(
    tokenizer, processes, block_sizes, encoder
):
    if encoder == "tokenizers":  # a tokenizer.json that tiktoken does not encode
        tokenizer = TextTokenizer(tokenizer.raw + b"\n", "edited")
        assert tiktoken_for_json(tokenizer.raw) is None
    text = " \n\t\n" * 40 + TRICKY_TEXT * 40
    expected = reference_ids(tokenizer, text)
    # Small blocks put block boundaries everywhere, including inside multi-byte runs' lines,
    # and, with processes, hand consecutive lines to different processes.
    for block_bytes in block_sizes:
        blocks = list(token_blocks(io.BytesIO(text.encode()), tokenizer, processes, block_bytes))
        ids = np.concatenate([block.ids for block in blocks])
        assert ids.dtype == np.uint16
        assert ids.tolist() == expected, block_bytes
        # A block within the leading 160 bytes of whitespace is blank, the others not.
        assert blocks[0].blank is (block_bytes < 160) and not blocks[-1].blank


@pytest.mark.parametrize("encoder_name", ["tiktoken", "tokenizers"])
def test_the_block_encoder_skips_normalizing_ascii_lines_without_changing_ids(
    tokenizer, encoder_name, monkeypatch
):
    if encoder_name == "tokenizers":
        monkeypatch.setattr("noodle.tiktoken_bpe.tiktoken", None)
    encoder = BlockEncoder(load_tokenizer().raw)
    # tiktoken reproduces the bundled tokenizer; then tokenizers' is not even built.
    assert (encoder.fast is not None) is (encoder_name == "tiktoken")
    assert (encoder.backend is not None) is (encoder_name == "tokenizers")
    mixed = TRICKY_TEXT * 3
    for text in (mixed, "only ascii\r\n  here\n", "\n".join(["café ﬁ"] * 3)):
        ids, replaced, blank = encoder(text.encode())
        assert ids.tolist() == reference_ids(tokenizer, text) and replaced == 0 and not blank
        if encoder_name == "tokenizers":  # switched back on
            assert isinstance(encoder.backend.normalizer, normalizers.NFC)
    # A line that NFC changes: the normalizer really is on for non-ASCII lines.
    decomposed = "e\u0301\n"
    assert encoder(decomposed.encode())[0].tolist() == tokenizer.encode("\u00e9\n")


def test_a_failing_tokenizer_process_is_one_clear_error():
    broken = load_tokenizer()
    broken.raw = b"{}"  # what the processes get: they fail to start
    expected = (
        r"a tokenizer process ended unexpectedly \(exit code 1\): "
        r"the tokenizer: not a valid tokenizer.json"
    )
    with pytest.raises(NoodleError, match=expected):
        list(token_blocks(io.BytesIO(b"some text\n" * 100), broken, 2, block_bytes=64))


def test_an_overlong_line_is_cut_between_words_without_changing_its_ids(tokenizer):
    line = " ".join(f"word{i}, and  two  spaces" for i in range(200))
    pieces = [
        block.lines for block in text_blocks(io.BytesIO(line.encode()), 64, max_line_bytes=128)
    ]
    assert len(pieces) > 10
    assert all(len(text.encode()) < 64 + 128 for lines in pieces for text in lines)
    assert "".join(text for lines in pieces for text in lines) == line
    piece_ids = [i for lines in pieces for text in lines for i in tokenizer.encode(text)]
    assert piece_ids == tokenizer.encode(line)

    # Without spaces the cut still falls between characters, never inside one.
    unspaced = "日本語" * 200
    blocks = list(text_blocks(io.BytesIO(unspaced.encode()), 50, max_line_bytes=100))
    assert len(blocks) > 10 and sum(block.replaced for block in blocks) == 0
    assert "".join(line for block in blocks for line in block.lines) == unspaced
    # Nor does a run of bytes that are no text at all grow without bound.
    garbage = list(text_blocks(io.BytesIO(b"\x80" * 300), 50, max_line_bytes=100))
    assert len(garbage) > 1 and sum(block.replaced for block in garbage) == 300


def resident_kib(path: Path) -> int:
    """How much of the file at `path` is mapped into this process and resident."""
    total, in_mapping = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            in_mapping = line.endswith(str(path))
        elif in_mapping and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_pass_over_a_token_file_does_not_leave_it_resident(tmp_path):
    path = tmp_path / "tokens.uint16"
    np.arange(1 << 16, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    total = sum(int(chunk.sum(dtype=np.int64)) for chunk in token_chunks(tokens, 4096))
    assert resident_kib(path) == 0
    assert total == sum(range(1 << 16))
    assert int(tokens[-1]) == (1 << 16) - 1  # released pages read back from the file


def test_token_chunks_cut_any_array_in_order():
    chunks = list(token_chunks(np.arange(10, dtype=np.uint16), 4))
    assert [chunk.tolist() for chunk in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("processes", [0, 2], ids=["threads", "2"])
def test_invalid_utf8_is_replaced_and_warned(tmp_path, tokenizer, capsys, processes):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe bytes\nend\n\x80" * 3)
    with LocalFile(path).open() as opened, (tmp_path / "tokens").open("wb+") as out:
        tokenize_to_file(opened, tokenizer, out, Reporter(interactive=False), 16, processes)
        out.seek(0)
        tokens = np.fromfile(out, dtype=np.uint16)
    text = "good line\nbad \ufffd\ufffd bytes\nend\n\ufffd" * 3
    assert tokens.tolist() == reference_ids(tokenizer, text)
    assert "9 invalid UTF-8 byte sequence(s) replaced" in capsys.readouterr().err


COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data),
    "xz": lambda data: lzma.compress(data),
    "bzip2": lambda data: bz2.compress(data),
    "zstd": lambda data: pytest.importorskip("zstandard").ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("compression", COMPRESSORS)
def test_a_compressed_corpus_is_read_as_its_text_whatever_its_name(
    compression, tmp_path, tokenizer, capsys, cache_home
):
    text = TRICKY_TEXT * 50
    half = len(text) // 2
    # Two compressed streams one after the other, as `cat a.gz b.gz` makes: both are read.
    compressed = b"".join(
        COMPRESSORS[compression](part.encode()) for part in (text[:half], text[half:])
    )
    path = tmp_path / "corpus.txt"  # the name says nothing: the magic bytes decide
    path.write_bytes(compressed)
    tokens = load_token_stream(str(path), tokenizer, Reporter(interactive=False))
    assert tokens.tolist() == reference_ids(tokenizer, text)
    assert "".join(read_lines(str(path), Reporter(interactive=False))) == text
    assert "warning" not in capsys.readouterr().err


def test_zstd_without_its_package_says_how_to_get_it(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    path = tmp_path / "corpus.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(64))
    with pytest.raises(NoodleError) as error:
        load_token_stream(str(path), tokenizer, Reporter(interactive=False), use_cache=False)
    assert str(error.value) == (
        f"corpus {path} is zstd-compressed: reading zstd needs the zstandard package "
        "(pip install zstandard, or decompress it first: zstd -d FILE)"
    )


def test_local_tokens_are_cached_until_the_file_changes(tmp_path, tokenizer, capsys, cache_home):
    path = tmp_path / "corpus.txt"
    path.write_text(story_corpus(50))
    reporter = Reporter(interactive=False)
    first = load_token_stream(str(path), tokenizer, reporter)
    assert isinstance(first, np.memmap)
    assert first.tolist() == reference_ids(tokenizer, path.read_text())
    assert len(cached_files(cache_home)) == 1
    assert "cache hit" not in capsys.readouterr().err

    second = load_token_stream(str(path), tokenizer, reporter)
    assert "token cache hit" in capsys.readouterr().err
    assert second.tolist() == first.tolist()

    path.write_text(story_corpus(50, seed=1))
    changed = load_token_stream(str(path), tokenizer, reporter)
    assert changed.tolist() == reference_ids(tokenizer, path.read_text())
    assert len(cached_files(cache_home)) == 2

    uncached = load_token_stream(str(path), tokenizer, reporter, use_cache=False)
    assert uncached.tolist() == changed.tolist()
    assert len(cached_files(cache_home)) == 2
    assert not list(cache_home.glob(".*"))  # no temporary file left behind


@dataclass
class Route:
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    redirect: str | None = None
    # Announce more bytes than are sent, then hang up: a download that breaks off.
    truncate: bool = False
    # Send this many bytes, then wait for the event before sending the rest.
    pause_after: int | None = None
    resume: threading.Event = field(default_factory=threading.Event)
    # Wait this long before answering at all.
    delay_s: float = 0.0


class CorpusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), CorpusHandler)
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict]] = []

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_address[1]}{path}"


class CorpusHandler(BaseHTTPRequestHandler):
    server: CorpusServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers)))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        time.sleep(route.delay_s)
        if route.redirect:
            self.send_response(302)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        for name, value in route.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(route.body) + 1000 * route.truncate))
        self.end_headers()
        if route.pause_after is not None:
            self.wfile.write(route.body[: route.pause_after])
            self.wfile.flush()
            route.resume.wait(10)
            self.wfile.write(route.body[route.pause_after :])
        else:
            self.wfile.write(route.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[CorpusServer]:
    httpd = CorpusServer()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    for route in httpd.routes.values():
        route.resume.set()
    httpd.shutdown()
    httpd.server_close()


def test_train_streams_a_corpus_from_a_url(
    tmp_path, tiny_config, server, cli_in_process, one_torch_thread
):
    server.routes["/stories.txt"] = Route(story_corpus(150).encode())
    out = tmp_path / "model"
    code, _, err = cli_in_process(
        *("train", server.url("/stories.txt"), out, "--model", tiny_config),
        *("--backend", "cpu", "--max-steps", 1, "--batch-size", 2, "--eval-batches", 1),
    )
    assert code == 0, err
    assert "tokenizing" in err
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["source"] == server.url("/stories.txt")
    assert meta["training"]["steps"] == 1
    # No ETag or Last-Modified: nothing identifies the content, so nothing is cached.
    assert "not caching the tokens" in err


def test_a_missing_url_is_one_clear_error(tmp_path, server, cli_in_process):
    url = server.url("/missing.txt")
    code, _, err = cli_in_process("train", url, tmp_path / "model")
    assert code == 1
    assert err.strip().splitlines()[-1] == f"error: cannot download {url}: HTTP 404 Not Found"
    assert "Traceback" not in err


def test_an_unreachable_url_names_it(tokenizer):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/corpus.txt"
    with pytest.raises(NoodleError, match=f"cannot reach {url}: Connection refused"):
        load_token_stream(url, tokenizer, Reporter(quiet=True))


def test_an_unknown_host_names_the_url(tokenizer):
    url = "http://noodle-test.invalid/corpus.txt"  # .invalid never resolves (RFC 2606)
    with pytest.raises(NoodleError, match=f"cannot reach {url}: "):
        load_token_stream(url, tokenizer, Reporter(quiet=True))


def test_a_silent_server_times_out_with_the_url(tokenizer, server, monkeypatch):
    monkeypatch.setattr(sources, "HTTP_TIMEOUT_S", 0.2)
    server.routes["/slow.txt"] = Route(b"late\n", delay_s=2)
    url = server.url("/slow.txt")
    with pytest.raises(NoodleError, match=f"cannot reach {url}: timed out"):
        load_token_stream(url, tokenizer, Reporter(quiet=True))


def test_a_broken_download_fails_and_caches_nothing(tokenizer, server, cache_home):
    server.routes["/cut.txt"] = Route(story_corpus(20).encode(), {"ETag": '"v1"'}, truncate=True)
    url = server.url("/cut.txt")
    with pytest.raises(NoodleError, match=f"download of {url} failed after .* bytes"):
        load_token_stream(url, tokenizer, Reporter(quiet=True))
    assert not any(cache_home.iterdir())


def test_a_url_with_a_validator_is_cached(tokenizer, server, cache_home, capsys):
    text = story_corpus(40)
    server.routes["/tagged.txt"] = Route(text.encode(), {"ETag": '"v1"'})
    reporter = Reporter(interactive=False)
    first = load_token_stream(server.url("/tagged.txt"), tokenizer, reporter)
    assert first.tolist() == reference_ids(tokenizer, text)
    assert len(cached_files(cache_home)) == 1
    again = load_token_stream(server.url("/tagged.txt"), tokenizer, reporter)
    assert again.tolist() == first.tolist()
    assert "token cache hit" in capsys.readouterr().err

    # A new version of the file (new ETag) is tokenized again.
    server.routes["/tagged.txt"] = Route(text.upper().encode(), {"ETag": '"v2"'})
    changed = load_token_stream(server.url("/tagged.txt"), tokenizer, reporter)
    assert changed.tolist() == reference_ids(tokenizer, text.upper())
    assert len(cached_files(cache_home)) == 2


def test_a_url_is_read_as_a_stream(server):
    body = story_corpus(200).encode()
    route = server.routes["/big.txt"] = Route(body, pause_after=5000)
    blocks = []
    with WebFile(server.url("/big.txt"), "big").open() as opened:
        assert opened.size == len(body)
        for block in text_blocks(opened.stream, block_bytes=1000):
            # The first blocks arrive while the server still holds back the rest.
            blocks.append((block, route.resume.is_set()))
            route.resume.set()
    assert blocks[0][1] is False and len(blocks) > 5
    assert b"".join("".join(block.lines).encode() for block, _ in blocks) == body


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        (
            "hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt",
            "TinyStoriesV2-GPT4-valid.txt",
        ),
        ("hf://owner/repo/data/train/part 1.txt", "data/train/part%201.txt"),
        ("hf://datasets/owner/repo/data/part.txt", "data/part.txt"),
    ],
)
def test_hf_specs_name_dataset_files(spec, path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    owner_repo = "roneneldan/TinyStories" if "TinyStories" in spec else "owner/repo"
    assert hf_url(spec) == f"https://huggingface.co/datasets/{owner_repo}/resolve/main/{path}"


@pytest.mark.parametrize(
    "spec", ["hf://", "hf://owner", "hf://owner/repo", "hf://owner//file.txt", "hf://o/r/dir/"]
)
def test_an_invalid_hf_spec_says_the_expected_form(spec):
    with pytest.raises(UsageError, match="expected hf://owner/repo/path/to/file"):
        hf_url(spec)


def test_hf_sends_the_token_to_the_hub_only(tokenizer, server, monkeypatch):
    text = story_corpus(30)
    server.routes["/cdn/file.txt"] = Route(text.encode())
    server.routes["/datasets/me/stories/resolve/main/dir/file.txt"] = Route(
        redirect=server.url("/cdn/file.txt", host="localhost")  # another host, like a CDN
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    tokens = load_token_stream("hf://me/stories/dir/file.txt", tokenizer, Reporter(quiet=True))
    assert tokens.tolist() == reference_ids(tokenizer, text)
    (hub_path, hub_headers), (cdn_path, cdn_headers) = server.requests
    assert hub_path == "/datasets/me/stories/resolve/main/dir/file.txt"
    assert hub_headers["Authorization"] == "Bearer hf_secret"
    assert cdn_path == "/cdn/file.txt" and "Authorization" not in cdn_headers


def test_hf_errors_name_the_spec_and_the_url(tokenizer, server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    url = server.url("/datasets/me/stories/resolve/main/nope.txt")
    with pytest.raises(NoodleError, match=f"hf://me/stories/nope.txt \\({url}\\): HTTP 404"):
        load_token_stream("hf://me/stories/nope.txt", tokenizer, Reporter(quiet=True))


def test_train_reads_standard_input_and_never_caches_it(tmp_path, tiny_config, cache_home):
    out = tmp_path / "model"
    result = run_noodle(
        *("train", "-", out, "--model", tiny_config, "--backend", "cpu"),
        *("--max-steps", 1, "--batch-size", 2, "--eval-batches", 1),
        input=story_corpus(150),
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file()
    assert cached_files(cache_home) == []


def test_read_lines_streams_any_source(server, capsys):
    server.routes["/lines.txt"] = Route(b"one\ntwo \xff\nthree")
    lines = list(read_lines(server.url("/lines.txt"), Reporter(interactive=False)))
    assert lines == ["one\n", "two \ufffd\n", "three"]
    assert "1 invalid UTF-8 byte sequence(s)" in capsys.readouterr().err


def processes_with(marker: str) -> set[int]:
    """Processes (of this user) whose environment contains `marker`."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.add(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            pass
    return found


def wait_for(condition, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@LINUX_ONLY
@pytest.mark.skipif(available_cores() < 2, reason="one core: tokenized in one process")
def test_ctrl_c_while_tokenizing_leaves_no_tokenizer_processes_or_files(
    tmp_path, tiny_config, server
):
    """Ctrl-C (to the whole process group, as a terminal sends it) while tokenizer processes
    work stops them all and removes the partial cache file. The download pauses, so the
    run is surely still tokenizing."""
    body = story_corpus(140_000).encode()  # 9.6 MB: one process per core, at least two
    server.routes["/big.txt"] = Route(body, {"ETag": '"v1"'}, pause_after=len(body) // 4)
    cache, log = tmp_path / "xdg", tmp_path / "stderr.log"
    args = ("train", server.url("/big.txt"), tmp_path / "model", "--model", tiny_config)
    with log.open("w") as stderr:
        process = subprocess.Popen(
            noodle_command((*args, "--backend", "cpu", "--max-steps", 1)),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=noodle_env({"XDG_CACHE_HOME": str(cache)}),
            start_new_session=True,
        )
    try:
        # The command, at least two tokenizer processes, and the cache file being written.
        assert wait_for(
            lambda: len(processes_with(str(cache))) >= 3 and any((cache / "noodle").glob(".*.tmp"))
        ), log.read_text()
        os.killpg(process.pid, signal.SIGINT)
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert wait_for(lambda: not processes_with(str(cache)), timeout=10)
    stderr = log.read_text()
    assert exit_code == 130 and stderr.splitlines()[-1] == "error: interrupted by SIGINT", stderr
    assert "Traceback" not in stderr
    assert list((cache / "noodle").iterdir()) == []


@LINUX_ONLY
def test_tokenizer_processes_end_with_a_killed_command(tmp_path):
    """A command killed at once (no cleanup runs): its tokenizer processes read the end of
    their input and exit, while it waits for more of its own input."""
    marker = str(tmp_path)  # in the environment of the command and its processes
    code = (
        "import sys; from noodle.corpus import token_blocks; "
        "from noodle.tokenizer import load_tokenizer; "
        "[print(len(block.ids), flush=True) "
        "for block in token_blocks(sys.stdin.buffer, load_tokenizer(), 2, 64)]"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=noodle_env({"NOODLE_TEST_MARKER": marker}),
    )
    try:
        process.stdin.write(b"a line of text\n" * 100)  # 25 blocks; the input stays open
        process.stdin.flush()
        assert int(process.stdout.readline()) > 0  # the processes have tokenized a block
        assert len(processes_with(marker)) == 3
    finally:
        process.kill()
        process.wait()
    assert wait_for(lambda: not processes_with(marker), timeout=10)

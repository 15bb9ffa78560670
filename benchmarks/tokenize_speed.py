"""Tokenization speed of the corpus pipeline against the encoding libraries' own ceiling,
with the cores each uses and its peak memory.

Five measurements on one text file, each in a fresh process whose process tree's resident
memory is sampled (see process_memory.py):

- library, 1 process: `encode_batch_fast` with the library's own parallelism (a Rayon
  thread per core) over batches of --batch-mb of lines; only those calls are timed.
- library, N processes: N processes of one thread each encode a share of the lines (cut
  at line boundaries) with `encode_batch_fast` in blocks of the pipeline's size and take
  the ids out into an array, as any pipeline must; timed from a common start to the last
  one done.
- tiktoken, N processes: the same with tiktoken's `encode_ordinary` on each block whole,
  with the pattern that keeps lines apart (the library alone: the added tokens that
  noodle's `tiktoken_bpe` cuts out first are left in the text).
- noodle, 1 process: `tokenize_to_file` in-process (a thread reads, another encodes: on
  one core with tiktoken, on all with tokenizers; the calling thread writes the ids), as
  for a small corpus.
- noodle, N processes: `tokenize_to_file` as `noodle train` runs it on a large corpus,
  with N tokenizer processes; timed from the start, the processes' start-up included.
- noodle, N processes' start-up: what the last costs before any text, each process
  started and its first (one-line) block encoded.

N is the number of cores available (or --processes). Runs are interleaved; the best of
--repeats counts, and the fastest library measurement is the ceiling. MB/CPU-s is the speed
per busy core (CPU time of all processes and threads; on a busy machine the wall-clock
figures mislead, this less so), and the last line what the main process's own CPU time
allows, the limit of scaling by more processes.

    PYTHONPATH=. python benchmarks/tokenize_speed.py TEXT

TEXT may be xz-compressed (`.xz`); it is then decompressed next to itself, once.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import lzma
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import tiktoken
import tokenizers

from benchmarks.process_memory import TreePeakMemory
from noodle.cores import available_cores
from noodle.corpus import (
    BLOCK_BYTES,
    TextBlock,
    TokenizerProcess,
    text_blocks,
    tokenize_to_file,
)
from noodle.progress import Reporter
from noodle.sources import LocalFile
from noodle.tiktoken_bpe import TiktokenText, uses_tiktoken
from noodle.tokenizer import load_tokenizer
from noodle.tokenizer_worker import id_array, token_itemsize

MEASUREMENTS = {
    "library-1": "library: encode_batch_fast, 1 process",
    "library-n": "library: encode_batch_fast + ids, N processes",
    "tiktoken-n": "tiktoken: encode_ordinary + ids, N processes",
    "noodle-1": "noodle: 1 process",
    "noodle-n": "noodle: N tokenizer processes",
    "startup-n": "noodle: N tokenizer processes' start-up",
}


def decompressed(path: Path) -> Path:
    if path.suffix != ".xz":
        return path
    plain = path.with_suffix("")
    if not plain.exists():
        print(f"decompressing {path} to {plain}", flush=True)
        partial = plain.with_name(plain.name + ".partial")
        with lzma.open(path) as source, partial.open("wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        partial.rename(plain)
    return plain


def share_of(path: Path, index: int, count: int) -> bytes:
    """Share `index` of `count` of the file's bytes, both ends moved to a line start."""
    size = path.stat().st_size
    with path.open("rb") as handle:

        def line_start(offset: int) -> int:
            if offset in (0, size):
                return offset
            handle.seek(offset - 1)
            return offset - 1 + len(handle.readline())

        start, end = line_start(index * size // count), line_start((index + 1) * size // count)
        handle.seek(start)
        return handle.read(end - start)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Timing(NamedTuple):
    seconds: float  # wall clock
    cpu_seconds: float  # all processes and threads
    main_cpu_seconds: float  # the process that reads and writes (noodle, N processes)
    tokens_sha256: str = ""  # of the token file (noodle)


def library_one_process(text: Path, batch_bytes: int) -> Timing:
    encode = load_tokenizer().backend.encode_batch_fast
    seconds = cpu_seconds = 0.0
    with text.open("rb") as stream:
        for block in text_blocks(stream, batch_bytes):
            started, cpu_started = time.perf_counter(), time.process_time()
            encode(block.lines, add_special_tokens=False)
            seconds += time.perf_counter() - started
            cpu_seconds += time.process_time() - cpu_started
    return Timing(seconds, cpu_seconds, cpu_seconds)


def block_ids(library: str) -> Callable[[TextBlock], Iterable[int]]:
    """A block's ids by `library` alone (tokenizers or tiktoken)."""
    tokenizer = load_tokenizer()
    if library == "tiktoken":
        encode_text = TiktokenText(json.loads(tokenizer.raw)).encode_piece
        return lambda block: encode_text(block.text)
    encode = tokenizer.backend.encode_batch_fast
    return lambda block: itertools.chain.from_iterable(
        e.ids for e in encode(block.lines, add_special_tokens=False)
    )


def library_share(text: Path, library: str, index: int, count: int) -> None:
    """One of the N processes: decode its share, say ready, encode when told, say done
    and the CPU time that took."""
    encode, itemsize = block_ids(library), token_itemsize(load_tokenizer().vocab_size)
    blocks = list(text_blocks(io.BytesIO(share_of(text, index, count)), BLOCK_BYTES))
    print("ready", flush=True)
    sys.stdin.readline()
    cpu_started = time.process_time()
    for block in blocks:
        id_array(encode(block), itemsize)
    print(time.process_time() - cpu_started, flush=True)


def library_processes(text: Path, library: str, count: int) -> Timing:
    command = [sys.executable, __file__, str(text), "--share"]
    shares = [
        subprocess.Popen(
            [*command, f"{library}/{index}/{count}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},  # one thread each
        )
        for index in range(count)
    ]
    for share in shares:
        assert share.stdout.readline() == "ready\n"
    started = time.perf_counter()
    for share in shares:
        share.stdin.write("go\n")
        share.stdin.flush()
    cpu_seconds = sum(float(share.stdout.readline()) for share in shares)
    seconds = time.perf_counter() - started
    for share in shares:
        share.wait()
    return Timing(seconds, cpu_seconds, 0.0)


def noodle_pipeline(text: Path, processes: int) -> Timing:
    tokenizer = load_tokenizer()
    started, cpu_started = time.perf_counter(), time.process_time()
    children_started = children_cpu_seconds()
    with LocalFile(text).open() as opened, tempfile.TemporaryFile() as out:
        tokenize_to_file(opened, tokenizer, out, Reporter(quiet=True), processes=processes)
        seconds = time.perf_counter() - started
        main_cpu = time.process_time() - cpu_started
        workers_cpu = children_cpu_seconds() - children_started
        out.seek(0)
        digest = hashlib.sha256(out.read()).hexdigest()
    return Timing(seconds, main_cpu + workers_cpu, main_cpu, digest)


def startup(processes: int) -> Timing:
    tokenizer = load_tokenizer()
    started, children_started = time.perf_counter(), children_cpu_seconds()
    workers = [TokenizerProcess(tokenizer) for _ in range(processes)]
    for worker in workers:
        worker.send(b"a line\n")
    for worker in workers:
        worker.receive()
        worker.finish()
        worker.stop()
    seconds = time.perf_counter() - started
    return Timing(seconds, children_cpu_seconds() - children_started, 0.0)


def measure(name: str, text: Path, processes: int, batch_bytes: int) -> Timing:
    if name == "library-1":
        return library_one_process(text, batch_bytes)
    if name == "library-n":
        return library_processes(text, "tokenizers", processes)
    if name == "tiktoken-n":
        return library_processes(text, "tiktoken", processes)
    if name == "startup-n":
        return startup(processes)
    return noodle_pipeline(text, processes if name == "noodle-n" else 0)


def run_measurement(name: str, args: argparse.Namespace) -> tuple[Timing, float]:
    """The measurement's timing and the peak MiB of its process tree."""
    command = [sys.executable, __file__, str(args.text), "--measure", name]
    command += ["--processes", str(args.processes), "--batch-mb", str(args.batch_mb)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    memory = TreePeakMemory(child.pid)
    output, _ = child.communicate()
    peak = memory.stop()
    if child.returncode != 0:
        sys.exit(f"{name} failed (exit code {child.returncode})")
    return Timing(*json.loads(output.splitlines()[-1])), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("text", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=available_cores())
    parser.add_argument("--batch-mb", type=float, default=16, help="library, 1 process")
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--share", help=argparse.SUPPRESS)
    args = parser.parse_args()
    text = decompressed(args.text)
    if args.share:
        library, index, count = args.share.split("/")
        library_share(text, library, int(index), int(count))
        return
    if args.measure:
        timing = measure(args.measure, text, args.processes, int(args.batch_mb * 1e6))
        print(json.dumps(timing))
        return

    megabytes = text.stat().st_size / 1e6
    print(
        f"{text.name}: {megabytes:,.1f} MB | {available_cores()} cores available, "
        f"N = {args.processes} | {platform.machine()} {os.cpu_count()} CPUs | "
        f"tokenizers {tokenizers.__version__} | tiktoken {tiktoken.__version__} | "
        f"Python {platform.python_version()} | "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}",
        flush=True,
    )
    best: dict[str, Timing] = {}
    peak = dict.fromkeys(MEASUREMENTS, 0.0)
    for _ in range(args.repeats):
        for name in MEASUREMENTS:
            timing, memory = run_measurement(name, args)
            if name not in best or timing.seconds < best[name].seconds:
                best[name] = timing
            peak[name] = max(peak[name], memory)
    cores = {
        "library-1": f"{available_cores()} threads",
        "library-n": f"{args.processes} x 1",
        "tiktoken-n": f"{args.processes} x 1",
        # tiktoken encodes in one thread; tokenizers in a thread per core.
        "noodle-1": "1"
        if uses_tiktoken(load_tokenizer().sha256)
        else f"{available_cores()} threads",
        "noodle-n": f"1 + {args.processes} x 1",
        "startup-n": f"{args.processes} x 1",
    }
    ceiling = min(best[name].seconds for name in ("library-1", "library-n", "tiktoken-n"))
    header = f"{'cores':>12} {'MB/s':>7} {'of ceiling':>10} {'MB/CPU-s':>9} {'peak RSS':>12}"
    print(f"{'':<46} {header}")
    for name, label in MEASUREMENTS.items():
        timing = best[name]
        if name == "startup-n":
            seconds, cpu_seconds = timing.seconds, timing.cpu_seconds
            print(f"{label:<46} {cores[name]:>12} {seconds:6.2f} s, {cpu_seconds:.2f} CPU-s")
            continue
        print(
            f"{label:<46} {cores[name]:>12} {megabytes / timing.seconds:7.1f} "
            f"{ceiling / timing.seconds:10.0%} {megabytes / timing.cpu_seconds:9.2f} "
            f"{peak[name]:8,.0f} MiB"
        )
    same = best["noodle-1"].tokens_sha256 == best["noodle-n"].tokens_sha256
    print(f"noodle's two paths wrote the same token ids: {'yes' if same else 'NO'}")
    main_cpu = best["noodle-n"].main_cpu_seconds
    print(
        f"noodle, N processes: its main process (reading, writing) took {main_cpu:.2f} CPU-s, "
        f"so alone it would allow {megabytes / main_cpu:,.0f} MB/s"
    )


if __name__ == "__main__":
    main()

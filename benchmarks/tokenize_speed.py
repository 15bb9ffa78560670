"""Tokenization speed of the corpus pipeline against the tokenizers library's own ceiling.

The ceiling is `encode_batch` over all lines of the text at once (already in memory);
the pipeline is `load_token_stream` (read, decode, encode in blocks, write the token
file) on the same file, without the cache. Runs are interleaved; the best of each counts.

    PYTHONPATH=. python benchmarks/tokenize_speed.py ../shared/data/tinystories-sample.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from noodle.corpus import decode_lines, load_token_stream
from noodle.progress import Reporter
from noodle.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("text", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    data = args.text.read_bytes()
    lines, _ = decode_lines(data)
    megabytes = len(data) / 1e6
    runs = {
        "encode_batch (ceiling)": lambda: tokenizer.backend.encode_batch(
            lines, add_special_tokens=False
        ),
        "encode_batch_fast": lambda: tokenizer.backend.encode_batch_fast(
            lines, add_special_tokens=False
        ),
        "noodle pipeline": lambda: load_token_stream(
            str(args.text), tokenizer, Reporter(quiet=True), use_cache=False
        ),
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    ceiling = best["encode_batch (ceiling)"]
    for name, seconds in best.items():
        print(
            f"{name:<24} {megabytes / seconds:6.2f} MB/s  {ceiling / seconds:6.0%} of the ceiling"
        )


if __name__ == "__main__":
    main()

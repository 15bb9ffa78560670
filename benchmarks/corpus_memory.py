"""Peak memory and time to the first step of `noodle train` on a large corpus, run twice:
first tokenizing it, then from the token cache.

Each run is the CLI under `/usr/bin/time -v`, with a tiny model so that the corpus
handling, not the model, is measured:

    noodle train CORPUS OUT --max-steps 1 --batch-size 2 --model TINY.json

Two peaks (MiB): the largest single process ("Maximum resident set size" of time -v) and
the whole process tree, tokenizer processes included (sampled every 0.1 s, see
process_memory.py). The corpus is TEXT repeated up to the size asked for, or made-up
300-byte stories one per line with blank lines between (--short-lines), or made-up
sentences; it, the token cache and the outputs live in a temporary directory, removed
afterwards. Time to the first step runs from the launch to the first training record in
metrics.jsonl, written when step 1 is done: an upper bound on when training started.

    PYTHONPATH=. python benchmarks/corpus_memory.py --text ../shared/data/tinystories-sample.txt
    PYTHONPATH=. python benchmarks/corpus_memory.py --short-lines
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.process_memory import TreePeakMemory

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {"n_layers": 2, "emb_dim": 64, "n_heads": 2, "head_dim": 32, "hidden_dim": 128}
TINY_CTX_LEN = 64
SUBJECTS = ("The little dog", "A happy girl", "Tom", "Her mom", "The big cat", "Lily")
VERBS = ("saw", "found", "played with", "ran to", "jumped over", "smiled at")
OBJECTS = ("a red ball", "the old tree", "his friend", "the blue house", "the park", "a bird")


def made_up_text(lines: int, seed: int = 0) -> bytes:
    """Lines of a few simple random sentences, in case no text file is given."""
    rng = random.Random(seed)

    def sentence() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."

    text = "".join(
        " ".join(sentence() for _ in range(rng.randint(1, 6))) + "\n" for _ in range(lines)
    )
    return text.encode("utf-8")


def short_line_stories(stories: int, story_bytes: int = 300, seed: int = 0) -> bytes:
    """Stories of about `story_bytes` each on one line, a blank line between them: many short
    lines, the shape of a corpus exported one document per line."""
    rng = random.Random(seed)
    out = []
    for _ in range(stories):
        story = ""
        while len(story) < story_bytes:
            story += f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}. "
        out.append(story.rstrip() + "\n\n")
    return "".join(out).encode("utf-8")


def write_corpus(path: Path, text: bytes, size_bytes: int) -> None:
    """`text` repeated until the file holds at least `size_bytes`."""
    with path.open("wb") as handle:
        written = 0
        while written < size_bytes:
            handle.write(text)
            written += len(text)


def first_step_done(metrics: Path) -> float | None:
    """The wall-clock time of the first training record, or None if there is none."""
    if not metrics.exists():
        return None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            return record["time"]
    return None


def run_train(corpus: Path, out: Path, model: Path, cache: Path, extra: list[str]) -> dict:
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "noodle",
        "train",
        str(corpus),
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--model",
        str(model),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache)}
    launched = time.time()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    tree = TreePeakMemory(process.pid)
    _, stderr = process.communicate()
    tree_peak = tree.stop()
    if process.returncode != 0:
        sys.exit(f"noodle train failed ({process.returncode}):\n{stderr}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)[1])
    first_step = first_step_done(out / "metrics.jsonl")
    return {
        "peak_rss_mb": round(peak_kib / 1024, 1),
        "tree_peak_mb": round(tree_peak, 1),
        "first_step_s": round(first_step - launched, 1) if first_step else None,
        "total_s": round(time.time() - launched, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--text", type=Path, help="text to repeat (default: made-up sentences)")
    shape.add_argument(
        "--short-lines",
        action="store_true",
        help="made-up 300-byte stories, one per line, blank lines between",
    )
    parser.add_argument("--mb", type=float, default=120, help="corpus size in MB (1e6 bytes)")
    parser.add_argument("--model", type=Path, help="model config (default: a tiny one)")
    parser.add_argument("extra", nargs="*", help="more `noodle train` options, after --")
    args = parser.parse_args()
    if args.text:
        text = args.text.read_bytes()
    elif args.short_lines:
        text = short_line_stories(20_000)
    else:
        text = made_up_text(20_000)
    with tempfile.TemporaryDirectory(prefix="noodle-corpus-memory-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        write_corpus(corpus, text, int(args.mb * 1e6))
        model = args.model
        if model is None:
            model = tmp / "tiny.json"
            model.write_text(json.dumps({**TINY_MODEL, "ctx_len": TINY_CTX_LEN}))
        print(f"corpus {corpus.stat().st_size / 1e6:,.1f} MB | model {model}", flush=True)
        for label, out in (("tokenizing", tmp / "first"), ("cached", tmp / "second")):
            row = run_train(corpus, out, model, tmp / "cache", args.extra)
            print(
                f"{label:>10}: peak RSS {row['peak_rss_mb']:,.1f} MiB, process tree "
                f"{row['tree_peak_mb']:,.1f} MiB | first step done "
                f"{row['first_step_s']} s | whole run {row['total_s']} s",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""The corpora of benchmarks/quality.py: each split into training text and held-out test
text, from the original files, once; their tokens go to the token cache.

    PYTHONPATH=. python benchmarks/quality_corpora.py NAME --data DIR --work DIR

prepares one (quality.py starts one such process per corpus; importing no torch, they
start quickly).
"""

from __future__ import annotations

import argparse
import lzma
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from noodle.corpus import load_token_stream
from noodle.errors import NoodleError
from noodle.progress import Reporter
from noodle.tokenizer import TextTokenizer, load_tokenizer

END_OF_TEXT = "<|endoftext|>"
HELD_OUT_ONE_IN = 10


def split_books(source: Path, train: Path, test: Path) -> None:
    """Books separated by `<|endoftext|>` lines (xz-compressed): every tenth book (the
    10th, 20th, ...) goes to `test` whole, the others to `train`, each file in the same
    form. Streamed: no book is held in memory."""
    with (
        lzma.open(source, "rt", encoding="utf-8") as text,
        train.open("w", encoding="utf-8") as train_out,
        test.open("w", encoding="utf-8") as test_out,
    ):
        outputs, written = (train_out, test_out), [False, False]
        book, in_book = 0, False
        for line in text:
            if line.rstrip("\n") == END_OF_TEXT:
                if in_book:  # an empty book is no book
                    book, in_book = book + 1, False
                continue
            held = int(book % HELD_OUT_ONE_IN == HELD_OUT_ONE_IN - 1)
            if not in_book and written[held]:
                outputs[held].write(END_OF_TEXT + "\n")
            outputs[held].write(line)
            in_book, written[held] = True, True


def split_tail(source: Path, train: Path, test: Path) -> None:
    """The last tenth of the text, from the first paragraph break in it, goes to `test`
    (the stories are independent, so a tail is as good a sample as any)."""
    text = source.read_text(encoding="utf-8")
    start = len(text) - len(text) // HELD_OUT_ONE_IN
    cut = text.find("\n\n", start)
    cut = start if cut < 0 else cut + 2
    train.write_text(text[:cut], encoding="utf-8")
    test.write_text(text[cut:], encoding="utf-8")


@dataclass(frozen=True)
class CorpusSpec:
    source: str  # the original file's name in the data folder
    split: Callable[[Path, Path, Path], None]


# A row without `corpora` runs on each, in this order.
CORPORA = {
    "gutenberg": CorpusSpec("gutenberg-train.txt.xz", split_books),
    "tinystories": CorpusSpec("tinystories-sample.txt", split_tail),
}


def split_paths(work: Path, name: str) -> tuple[Path, Path]:
    """The training and the test text of corpus `name`."""
    return work / f"{name}-train.txt", work / f"{name}-test.txt"


def prepare_corpus(name: str, data: Path, work: Path, tokenizer: TextTokenizer) -> None:
    """Corpus `name`'s training and test files, split from the original in `data` unless
    a stamp says they were split from this very file, and their tokens in the cache."""
    source = data / CORPORA[name].source
    if not source.is_file():
        raise NoodleError(f"corpus {name}: {source} not found (copy it from ../shared/data)")
    train, test = split_paths(work, name)
    stamp, status = work / f"{name}.source", source.stat()
    origin = f"{source.resolve()} {status.st_size} {status.st_mtime_ns}"
    if not (stamp.is_file() and stamp.read_text() == origin):
        work.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            parts = Path(tmp) / "train.txt", Path(tmp) / "test.txt"
            CORPORA[name].split(source, *parts)
            parts[0].replace(train)
            parts[1].replace(test)
        stamp.write_text(origin)
    reporter = Reporter(interactive=False, quiet=True)
    for path in (train, test):
        load_token_stream(str(path), tokenizer, reporter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=list(CORPORA))
    parser.add_argument("--data", type=Path, required=True, help="the original files")
    parser.add_argument("--work", type=Path, required=True, help="where the splits go")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: the bundled one)")
    args = parser.parse_args()
    try:
        prepare_corpus(args.name, args.data, args.work, load_tokenizer(args.tokenizer))
    except NoodleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

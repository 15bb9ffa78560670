"""Instruction data for `noodle finetune`: the Dolly-style text format, the prompt format a
fine-tuned model is trained on (and chat must feed), and padded batches for the training loop.

A file holds blocks separated by `<|endoftext|>`:

    ### Instruction:
    <instruction>

    ### Input:            (optional)
    <context>

    ### Response:
    <response>

The model is trained on prompt + response + end-of-text, with the loss on the response and
end-of-text tokens only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from noodle.batching import TRAIN_FRACTION, Batch, share_of
from noodle.checkpoint import atomic_write_bytes
from noodle.corpus import read_lines
from noodle.errors import NoodleError
from noodle.loss import IGNORE
from noodle.progress import Reporter
from noodle.tokenizer import END_OF_TEXT, TextTokenizer

HEADER = re.compile(r"^###[ \t]*(Instruction|Input|Response)[ \t]*:[ \t]*", re.MULTILINE)
# Blocks are tokenized this many at a time: the batch API is parallel, the memory bounded.
ENCODE_CHUNK = 1024


# Ends every prompt, so that the model can tell where its answer starts. No instruction or
# input can hold this header line: the file format would read it as the response's start.
RESPONSE_HEADER = "\n\n### Response:\n"


def format_prompt(instruction: str, input: str = "") -> str:
    """The text a fine-tuned model reads before its answer: the instruction, a newline and
    the input when there is one, then the response header. Fine-tuning and chat both build
    prompts here."""
    return (f"{instruction}\n{input}" if input else instruction) + RESPONSE_HEADER


@dataclass(frozen=True)
class Instruction:
    """One parsed block; `input` is empty when the block has no `### Input:` section."""

    instruction: str
    input: str
    response: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)


def parse_block(block: str) -> Instruction | str:
    """The instruction in one block, or why the block is malformed.

    Sections are read in order: the first `### Instruction:` header, an optional
    `### Input:` after it, then the first `### Response:`; everything after that header is
    the response, so a response may itself contain `###` lines. Text before the
    instruction header (a preamble) is ignored.
    """
    block = block.replace("\r\n", "\n").replace("\r", "\n")
    headers = [(m.group(1), m) for m in HEADER.finditer(block)]
    instruction = next((m for name, m in headers if name == "Instruction"), None)
    if instruction is None:
        return "no ### Instruction:"
    after = [(name, m) for name, m in headers if m.start() > instruction.start()]
    response = next((m for name, m in after if name == "Response"), None)
    if response is None:
        return "no ### Response:"
    context = next(
        (m for name, m in after if name == "Input" and m.start() < response.start()), None
    )
    instruction_end = (context or response).start()
    text = block[instruction.end() : instruction_end].strip()
    input_text = block[context.end() : response.start()].strip() if context else ""
    response_text = block[response.end() :].strip()
    if not text:
        return "empty instruction"
    if not response_text:
        return "empty response"
    return Instruction(text, input_text, response_text)


def split_blocks(lines: Iterable[str]) -> Iterator[str]:
    """The text between `<|endoftext|>` markers, from lines that keep their newlines."""
    pending: list[str] = []
    for line in lines:
        while END_OF_TEXT in line:
            before, line = line.split(END_OF_TEXT, 1)
            pending.append(before)
            yield "".join(pending)
            pending = []
        pending.append(line)
    yield "".join(pending)


@dataclass
class ParsedFile:
    instructions: list[Instruction]
    skipped: Counter[str]  # why malformed blocks were skipped -> how many


def parse_instruction_lines(lines: Iterable[str]) -> ParsedFile:
    """Every valid instruction; blank blocks (e.g. after the last marker) are not counted."""
    parsed = ParsedFile([], Counter())
    for block in split_blocks(lines):
        if not block.strip():
            continue
        result = parse_block(block)
        if isinstance(result, Instruction):
            parsed.instructions.append(result)
        else:
            parsed.skipped[result] += 1
    return parsed


def read_instruction_file(spec: str, reporter: Reporter) -> ParsedFile:
    """Parse an instruction file (any corpus source) as it streams in; invalid UTF-8 is
    replaced with a warning."""
    return parse_instruction_lines(read_lines(spec, reporter, "instruction file"))


def reasons(skipped: Counter[str]) -> str:
    """Why things were skipped, most common first: "2 with no ### Response:, 1 with ..."."""
    return ", ".join(f"{count} with {reason}" for reason, count in skipped.most_common())


# -- token sequences --------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """prompt + response + end-of-text as token ids; the first `prompt_len` get no loss."""

    tokens: np.ndarray
    prompt_len: int

    def inputs_and_targets(self) -> tuple[np.ndarray, np.ndarray]:
        inputs = self.tokens[:-1].astype(np.int64)
        targets = self.tokens[1:].astype(np.int64)
        # targets[i] is token i + 1: the prompt's tokens after the first are not learned.
        targets[: self.prompt_len - 1] = IGNORE
        return inputs, targets


def build_example(
    prompt_ids: list[int], response_ids: list[int], eot_id: int, max_tokens: int
) -> tuple[Example, bool]:
    """The example, cut to `max_tokens` by dropping prompt tokens from the front, and
    whether it had to be cut. A response too long even for that keeps one prompt token to
    answer and loses its own end instead."""
    answer = [*response_ids, eot_id]
    cut = len(prompt_ids) + len(answer) > max_tokens
    if cut:
        keep = max(1, max_tokens - len(answer))
        prompt_ids, answer = prompt_ids[-keep:], answer[: max_tokens - keep]
    tokens = np.asarray([*prompt_ids, *answer], dtype=np.int32)
    return Example(tokens, len(prompt_ids)), cut


def tokenize_instructions(
    instructions: list[Instruction], tokenizer: TextTokenizer, ctx_len: int
) -> tuple[list[Example], int]:
    """Examples that fit the context window (ctx_len inputs, so ctx_len + 1 tokens), and
    how many had to be cut to fit."""
    examples, cut_count = [], 0
    for start in range(0, len(instructions), ENCODE_CHUNK):
        chunk = instructions[start : start + ENCODE_CHUNK]
        prompts = tokenizer.encode_batch([item.prompt for item in chunk])
        responses = tokenizer.encode_batch([item.response for item in chunk])
        for prompt_ids, response_ids in zip(prompts, responses, strict=True):
            example, cut = build_example(prompt_ids, response_ids, tokenizer.eot_id, ctx_len + 1)
            examples.append(example)
            cut_count += cut
    return examples, cut_count


def load_examples(
    spec: str, tokenizer: TextTokenizer, ctx_len: int, reporter: Reporter
) -> tuple[list[Example], int]:
    """The examples of an instruction file and how many malformed blocks were skipped
    (logged, with why); an error if no block is valid."""
    parsed = read_instruction_file(spec, reporter)
    skipped = sum(parsed.skipped.values())
    if skipped:
        reporter.warn(f"{spec}: {skipped} malformed block(s) skipped ({reasons(parsed.skipped)})")
    if not parsed.instructions:
        raise NoodleError(
            f"{spec}: no valid example (each needs a ### Instruction: and a ### Response: "
            "section, examples separated by <|endoftext|>)"
        )
    examples, cut = tokenize_instructions(parsed.instructions, tokenizer, ctx_len)
    if cut:
        reporter.info(
            f"{cut} example(s) longer than the context window of {ctx_len} tokens: their "
            "prompts lost tokens from the front"
        )
    return examples, skipped


def examples_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.prompt_len.to_bytes(4, "little"))
        digest.update(example.tokens.tobytes())
    return digest.hexdigest()[:16]


# -- batches ----------------------------------------------------------------------------


class InstructionBatches:
    """Examples in batches padded to their longest sequence (padding gets no loss).

    Training visits the examples in an order drawn from (seed, epoch), so (epoch, batch
    index) names any position of a run and resuming is exact.
    """

    def __init__(
        self, examples: list[Example], batch_size: int, pad_id: int, seed: int = 0
    ) -> None:
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.share = (0, 1)

    def take_share(self, rank: int, ranks: int) -> None:
        """From now on `get` returns process `rank`'s share of each batch (of `ranks`),
        padded to its own longest example."""
        self.share = (rank, ranks)

    def batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def collate(self, indices: Iterable[int]) -> Batch:
        pairs = [self.examples[i].inputs_and_targets() for i in indices]
        length = max(len(inputs) for inputs, _ in pairs)
        inputs = torch.full((len(pairs), length), self.pad_id, dtype=torch.long)
        targets = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
        for row, (example_inputs, example_targets) in enumerate(pairs):
            inputs[row, : len(example_inputs)] = torch.from_numpy(example_inputs)
            targets[row, : len(example_targets)] = torch.from_numpy(example_targets)
        return inputs, targets

    def get(self, epoch: int, index: int) -> Batch:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.collate(share_of(chosen, *self.share))

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        """Evenly spaced examples, at most max_batches batches, the same ones every time."""
        limit = min(len(self.examples), max_batches * self.batch_size)
        chosen = np.linspace(0, len(self.examples) - 1, num=limit).round().astype(np.int64)
        for start in range(0, limit, self.batch_size):
            yield self.collate(chosen[start : start + self.batch_size])


def validation_count(n_examples: int) -> int:
    """The 10% of a 90/10 split, at least one example."""
    return n_examples - int(n_examples * TRAIN_FRACTION)


def minimum_examples(batch_size: int) -> int:
    needed = batch_size + 1
    while needed - validation_count(needed) < batch_size:
        needed += 1
    return needed


def split_examples(
    examples: list[Example], batch_size: int, pad_id: int, seed: int, source: str
) -> tuple[InstructionBatches, InstructionBatches]:
    """A shuffled 90/10 split (files are often grouped by topic), or a clear error when the
    examples do not fill one training batch and one validation example."""
    if len(examples) < minimum_examples(batch_size):
        raise NoodleError(
            f"{source}: too few examples: it has {len(examples)} valid example(s), but one "
            f"training batch of {batch_size} and one validation example need at least "
            f"{minimum_examples(batch_size)} (lower --batch-size or add examples)"
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = validation_count(len(examples))
    validation = [examples[i] for i in sorted(order[:n_val])]
    training = [examples[i] for i in order[n_val:]]
    return (
        InstructionBatches(training, batch_size, pad_id, seed),
        InstructionBatches(validation, batch_size, pad_id, seed),
    )


# -- preparing instruction files from JSON ---------------------------------------------


def format_block(item: Instruction) -> str:
    """One block of the instruction file format, ending with its `<|endoftext|>` line."""
    context = f"### Input:\n{item.input}\n\n" if item.input else ""
    return (
        f"### Instruction:\n{item.instruction}\n\n{context}"
        f"### Response:\n{item.response}\n\n{END_OF_TEXT}\n"
    )


def parse_json(text: str, path: Path, line: int | None = None) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise NoodleError(
            f"{path}: malformed JSON at line {line or exc.lineno} ({exc.msg})"
        ) from None


def read_records(path: Path) -> object:
    """The records of a JSON array file or a JSON Lines file (one object per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NoodleError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise NoodleError(f"{path} is a directory, expected a JSON or JSONL file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NoodleError(f"{path}: cannot read ({exc})") from None
    if text.lstrip().startswith("["):
        return parse_json(text, path)
    return [
        parse_json(line, path, number)
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]


def record_instruction(record: object) -> Instruction | str:
    """An Alpaca (instruction/input/output) or Dolly (instruction/context/response) record
    as an instruction, or why it cannot be one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    fields = {
        "instruction": record.get("instruction"),
        "input": record.get("input", record.get("context")) or "",
        "response": record.get("output", record.get("response")),
    }
    if not all(isinstance(value, str) for value in fields.values()):
        return "a missing or non-text field"
    item = Instruction(**{name: value.strip() for name, value in fields.items()})
    if not item.instruction or not item.response:
        return "an empty instruction or response"
    # A text holding `<|endoftext|>` or a header line would read back as something else.
    read_back = parse_instruction_lines(format_block(item).splitlines(keepends=True))
    if read_back.instructions != [item] or read_back.skipped:
        return "text that the file format cannot hold"
    return item


def check_destination(source: Path, destination: Path, overwrite: bool) -> None:
    """Refuse a destination that is a directory, the input itself (the records would be
    lost), or, unless `overwrite`, any existing file, before anything is read."""
    if destination.is_dir():
        raise NoodleError(f"{destination} is a directory, expected a file path")
    if destination.exists() and source.exists() and destination.samefile(source):
        raise NoodleError(f"{destination} is the input file; write the instruction file elsewhere")
    if destination.exists() and not overwrite:
        raise NoodleError(f"{destination} already exists; add --force to overwrite it")


def prepare_instructions(
    source: Path, destination: Path, reporter: Reporter, overwrite: bool = False
) -> int:
    """Write the instruction file for a JSON/JSONL list of records; returns how many it
    holds. An existing destination is replaced only when `overwrite` is given."""
    check_destination(source, destination, overwrite)
    records = read_records(source)
    if not isinstance(records, list):
        raise NoodleError(f"{source}: expected a JSON array of records or JSON Lines")
    blocks, skipped = [], Counter()
    for record in records:
        result = record_instruction(record)
        if isinstance(result, Instruction):
            blocks.append(format_block(result))
        else:
            skipped[result] += 1
    if skipped:
        reporter.warn(f"{source}: {sum(skipped.values())} record(s) skipped ({reasons(skipped)})")
    if not blocks:
        raise NoodleError(f"{source}: no record has both an instruction and a response")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NoodleError(
            f"cannot create directory {destination.parent}: {exc.strerror or exc}"
        ) from None
    atomic_write_bytes(destination, "\n".join(blocks).encode("utf-8"))
    reporter.info(f"wrote {len(blocks):,} example(s) to {destination}")
    return len(blocks)

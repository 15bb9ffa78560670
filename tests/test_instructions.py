"""The instruction file format: parsing, token sequences and their loss mask, batches, the
90/10 split and `noodle prepare-instructions`."""

from __future__ import annotations

import json

import pytest
import torch

from noodle.errors import NoodleError
from noodle.instructions import (
    IGNORE,
    Instruction,
    InstructionBatches,
    build_example,
    format_block,
    format_prompt,
    parse_block,
    parse_instruction_lines,
    prepare_instructions,
    read_instruction_file,
    split_examples,
    tokenize_instructions,
)
from noodle.progress import Reporter
from tests.conftest import run_noodle

QUIET = Reporter(interactive=False, quiet=True)

FILE = """### Instruction:
Name a colour.

### Response:
Blue.

<|endoftext|>

### Instruction:
Translate to French.

### Input:
good morning

### Response:
bonjour

<|endoftext|>
"""


def parse(text: str):
    return parse_instruction_lines(text.splitlines(keepends=True))


def test_input_section_is_optional_and_joins_the_prompt_after_a_newline():
    parsed = parse(FILE)
    assert parsed.instructions == [
        Instruction("Name a colour.", "", "Blue."),
        Instruction("Translate to French.", "good morning", "bonjour"),
    ]
    assert not parsed.skipped
    assert parsed.instructions[0].prompt == format_prompt("Name a colour.")
    assert parsed.instructions[0].prompt == "Name a colour.\n\n### Response:\n"
    assert parsed.instructions[1].prompt == (
        "Translate to French.\ngood morning\n\n### Response:\n"
    )


def test_blocks_missing_a_section_are_skipped_and_counted():
    text = (
        "### Response:\nno instruction\n<|endoftext|>"
        "### Instruction:\nno response\n<|endoftext|>"
        "### Instruction:\nempty response\n### Response:\n   \n<|endoftext|>"
        "### Instruction:\n\n### Response:\nempty instruction\n<|endoftext|>"
        "### Instruction:\nkept\n### Response:\nyes\n<|endoftext|>\n\n"
    )
    parsed = parse(text)
    assert parsed.instructions == [Instruction("kept", "", "yes")]
    assert parsed.skipped == {
        "no ### Instruction:": 1,
        "no ### Response:": 1,
        "empty response": 1,
        "empty instruction": 1,
    }


def test_extra_whitespace_around_sections_and_headers_is_ignored():
    block = (
        "\n\n   \n### Instruction:   \n\n  What is two and two?  \n\n\n"
        "###   Input :\t\n\n  with care \n"
        "### Response:\nFour.\n  \n\n"
    )
    assert parse_block(block) == Instruction("What is two and two?", "with care", "Four.")
    # Text on the header's own line belongs to the section.
    assert parse_block("### Instruction: Hi\n### Response: Hello") == Instruction("Hi", "", "Hello")


def test_crlf_line_endings_parse_like_lf():
    assert parse(FILE.replace("\n", "\r\n")).instructions == parse(FILE).instructions


def test_hashes_inside_the_response_stay_in_the_response():
    response = "Steps:\n### Notes:\nfirst\n### Response:\nquoted header\n### Input:\nalso kept"
    block = f"### Instruction:\nExplain.\n\n### Response:\n{response}\n"
    assert parse_block(block) == Instruction("Explain.", "", response)


def test_file_reader_streams_blocks_and_replaces_invalid_bytes(tmp_path):
    path = tmp_path / "instructions.txt"
    path.write_bytes(FILE.encode() + b"### Instruction:\nbad \xff byte\n### Response:\nok\n")
    parsed = read_instruction_file(str(path), QUIET)
    assert len(parsed.instructions) == 3
    assert parsed.instructions[2].instruction == "bad \ufffd byte"


def test_label_mask_covers_exactly_the_response_and_end_of_text(tokenizer):
    item = Instruction("Translate to French.", "good morning", "bonjour tout le monde")
    (example,), cut = tokenize_instructions([item], tokenizer, ctx_len=64)
    prompt_ids = tokenizer.encode(item.prompt)
    answer_ids = [*tokenizer.encode(item.response), tokenizer.eot_id]
    assert not cut
    assert example.tokens.tolist() == prompt_ids + answer_ids
    inputs, targets = example.inputs_and_targets()
    assert inputs.tolist() == (prompt_ids + answer_ids)[:-1]
    learned = targets != IGNORE
    assert targets[learned].tolist() == answer_ids
    # The learned positions are the last len(answer) ones: the first is predicted from the
    # prompt's last token.
    assert learned.tolist() == [False] * (len(prompt_ids) - 1) + [True] * len(answer_ids)


def test_too_long_examples_lose_prompt_tokens_from_the_front(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(100))
    item = Instruction(prompt, "", "the answer")
    (example,), cut = tokenize_instructions([item], tokenizer, ctx_len=16)
    answer_ids = [*tokenizer.encode("the answer"), tokenizer.eot_id]
    assert cut == 1
    assert len(example.tokens) == 17  # ctx_len inputs plus the last target
    assert example.tokens[-len(answer_ids) :].tolist() == answer_ids
    # The prompt's end, with the response header that ends every prompt, is kept.
    assert (
        example.tokens[: example.prompt_len].tolist()
        == tokenizer.encode(format_prompt(prompt))[-example.prompt_len :]
    )
    _, targets = example.inputs_and_targets()
    assert targets[targets != IGNORE].tolist() == answer_ids


def test_a_response_longer_than_the_window_keeps_its_start_and_one_prompt_token():
    example, cut = build_example([7, 8, 9], list(range(100, 130)), eot_id=0, max_tokens=10)
    assert cut
    assert example.tokens.tolist() == [9, *range(100, 109)]
    assert example.prompt_len == 1


def test_batches_pad_to_the_longest_sequence_without_loss_on_padding():
    short, _ = build_example([5, 6], [7], eot_id=0, max_tokens=100)
    long, _ = build_example([5, 6, 7, 8], [9, 10, 11], eot_id=0, max_tokens=100)
    inputs, targets = InstructionBatches([short, long], 2, pad_id=1).collate([0, 1])
    # short is 5 6 | 7 <eot>, long is 5 6 7 8 | 9 10 11 <eot>: inputs drop the last token.
    assert inputs.tolist() == [[5, 6, 7, 1, 1, 1, 1], [5, 6, 7, 8, 9, 10, 11]]
    assert targets.tolist() == [
        [IGNORE, 7, 0, IGNORE, IGNORE, IGNORE, IGNORE],
        [IGNORE, IGNORE, IGNORE, 9, 10, 11, 0],
    ]
    assert targets.dtype == inputs.dtype == torch.long


def test_split_keeps_a_validation_example_and_shuffles_reproducibly():
    examples = [build_example([i + 2], [i + 3], 0, 10)[0] for i in range(5)]
    train, val = split_examples(examples, 4, pad_id=1, seed=3, source="x")
    assert (len(train.examples), len(val.examples)) == (4, 1)
    assert train.batches_per_epoch() == 1
    again, _ = split_examples(examples, 4, pad_id=1, seed=3, source="x")
    assert [e.tokens.tolist() for e in again.examples] == [
        e.tokens.tolist() for e in train.examples
    ]
    first, second = train.get(0, 0), train.get(1, 0)
    assert sorted(first[0][:, 0].tolist()) == sorted(second[0][:, 0].tolist())
    (val_inputs, _), *rest = list(val.eval_batches(10))
    assert val_inputs.shape[0] == 1 and not rest


def test_evaluation_uses_at_most_max_batches_spread_over_the_examples():
    examples = [build_example([i + 2], [i + 3], 0, 10)[0] for i in range(10)]
    batches = list(InstructionBatches(examples, 4, pad_id=1).eval_batches(2))
    firsts = [int(row[0]) for inputs, _ in batches for row in inputs]
    assert firsts == [2, 3, 5, 6, 7, 8, 10, 11]  # 8 of the 10, first and last included
    assert len(list(InstructionBatches(examples, 4, pad_id=1).eval_batches(50))) == 3


def test_split_rejects_fewer_examples_than_one_batch_and_a_validation_example():
    examples = [build_example([2], [3], 0, 10)[0] for _ in range(4)]
    with pytest.raises(NoodleError, match=r"4 valid example.*batch of 4.*at least 5"):
        split_examples(examples, 4, pad_id=1, seed=0, source="x")


def test_prepare_turns_alpaca_and_dolly_records_into_a_parsable_file(tmp_path):
    records = [
        {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
        {"instruction": "Summarize.", "context": "A long text.", "response": "Short."},
        {"instruction": "No answer"},
        {"instruction": "Sneaky", "output": "ends <|endoftext|> early"},
        ["not", "an", "object"],
    ]
    source = tmp_path / "records.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    destination = tmp_path / "out" / "instructions.txt"
    assert prepare_instructions(source, destination, QUIET) == 2
    parsed = parse(destination.read_text())
    assert parsed.instructions == [
        Instruction("Add 2 and 2.", "", "4"),
        Instruction("Summarize.", "A long text.", "Short."),
    ]
    assert not parsed.skipped
    assert destination.read_text() == "\n".join(format_block(i) for i in parsed.instructions)

    as_array = tmp_path / "records.json"
    as_array.write_text(json.dumps(records[:2]))
    assert prepare_instructions(as_array, tmp_path / "array.txt", QUIET) == 2
    assert (tmp_path / "array.txt").read_text() == destination.read_text()


def test_prepare_cli_writes_the_file(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    out = tmp_path / "instructions.txt"
    result = run_noodle("prepare-instructions", records, out)
    assert result.returncode == 0, result.stderr
    assert parse(out.read_text()).instructions == [Instruction("Hi", "", "Hello")]
    assert result.stderr == f"wrote 1 example(s) to {out}\n"


def test_prepare_overwrites_a_file_only_with_force(tmp_path, cli_in_process):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"instruction": "Bye", "output": "Goodbye"}) + "\n")
    out = tmp_path / "instructions.txt"
    out.write_text("mine")
    code, _, err = cli_in_process("prepare-instructions", records, out)
    assert code == 1
    assert err == f"error: {out} already exists; add --force to overwrite it\n"
    assert out.read_text() == "mine"
    code, _, err = cli_in_process("prepare-instructions", records, out, "--force")
    assert code == 0, err
    assert parse(out.read_text()).instructions == [Instruction("Bye", "", "Goodbye")]


def test_prepare_reports_malformed_json_with_its_line(tmp_path, cli_in_process):
    records = tmp_path / "bad.jsonl"
    records.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n{oops\n")
    code, _, err = cli_in_process("prepare-instructions", records, tmp_path / "out.txt")
    assert code == 1
    assert err.splitlines() == [
        f"error: {records}: malformed JSON at line 2 (Expecting property name enclosed in "
        "double quotes)"
    ]
    assert not (tmp_path / "out.txt").exists()


def test_prepare_rejects_records_without_any_usable_example(tmp_path, cli_in_process):
    records = tmp_path / "empty.json"
    records.write_text(json.dumps([{"instruction": "no answer"}, {"output": "no question"}]))
    code, _, err = cli_in_process("prepare-instructions", records, tmp_path / "out.txt")
    assert code == 1
    assert err.splitlines()[-1] == (
        f"error: {records}: no record has both an instruction and a response"
    )

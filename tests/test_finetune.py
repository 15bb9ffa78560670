"""End-to-end: the real CLI fine-tunes a tiny trained model on a few question/answer pairs,
and `noodle info` shows what the resulting directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from noodle.chat import ChatOptions, open_session
from noodle.checkpoint import load_model
from noodle.inference import Session, generate
from noodle.instructions import Instruction, format_prompt, tokenize_instructions
from noodle.sampling import SamplingSettings
from tests.conftest import ONE_THREAD, PAIRS, run_noodle, write_instructions
from tests.tiny_runs import read_metrics


@pytest.fixture(scope="module")
def finetuned(trained_base, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finetune")
    # Every pair four times: the two validation examples repeat training pairs, so every
    # question is trained on.
    instructions = write_instructions(work / "qa.txt", PAIRS * 4)
    out = work / "tuned"
    result = run_noodle(
        *("finetune", trained_base, instructions, out, "--backend", "cpu"),
        *("--max-epochs", 25, "--lr", 1e-2, "--patience", 100),
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    assert "18 training / 2 validation" in result.stderr
    assert result.stdout.strip(), "the closing sample reply goes to stdout"
    return out


def greedy_answers(model_dir: Path, questions: list[str]) -> list[str]:
    loaded = load_model(model_dir)
    answers = []
    for question in questions:
        session = Session(loaded.model, loaded.tokenizer)
        ids = generate(session, format_prompt(question), 30, SamplingSettings(temperature=0))
        answers.append(loaded.tokenizer.decode(list(ids)))
    return answers


def test_finetuned_model_answers_training_questions_with_their_answers(
    finetuned, trained_base, cli_in_process, one_torch_thread
):
    questions, answers = map(list, zip(*PAIRS, strict=True))
    assert greedy_answers(finetuned, questions) == answers
    # The base model had never seen these answers.
    assert greedy_answers(trained_base, questions[:1]) != answers[:1]
    # And `noodle chat` itself gives the trained answer.
    code, out, err = cli_in_process(
        "chat", finetuned, "--prompt", questions[0], "--temperature", 0, "--backend", "cpu"
    )
    assert code == 0, err
    assert out.strip() == answers[0]


def test_finetuned_directory_is_complete_and_records_its_base(finetuned, trained_base):
    for name in ("model.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
        assert (finetuned / name).is_file(), name
    assert (finetuned / "tokenizer.json").read_bytes() == (
        trained_base / "tokenizer.json"
    ).read_bytes()
    meta = json.loads((finetuned / "model.json").read_text())
    base_meta = json.loads((trained_base / "model.json").read_text())
    training = meta["training"]
    assert training["kind"] == "finetune" and training["status"] == "finished"
    assert training["base_model"] == str(trained_base.resolve())
    assert training["base_training"] == base_meta["training"]
    assert training["examples"] == 20 and training["batch_size"] == 4
    assert training["steps"] == 100  # 25 epochs of 18 training examples in batches of 4
    assert {k: meta[k] for k in ("n_layers", "emb_dim", "vocab_size", "tokenizer")} == {
        k: base_meta[k] for k in ("n_layers", "emb_dim", "vocab_size", "tokenizer")
    }
    evals = [m for m in read_metrics(finetuned) if m["kind"] == "eval"]
    assert len(evals) == 25  # one per epoch
    assert training["best_val_loss"] == min(e["val_loss"] for e in evals) < 0.1


def test_info_shows_architecture_tokenizer_training_and_base(
    finetuned, cli_in_process, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "120")
    code, out, err = cli_in_process("info", finetuned / "model.json")
    assert code == 0, err
    meta = json.loads((finetuned / "model.json").read_text())
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    assert rows["n_layers"] == "2" and rows["ctx_len"] == "64"
    assert rows["parameters"] == f"{meta['parameters']:,}"
    assert rows["end-of-text id"] == "0" and rows["tokenizer"] == "tokenizer.json"
    assert rows["kind"] == "finetune" and rows["steps"] == "100"
    assert rows["best validation loss"].startswith(f"{meta['training']['best_val_loss']:.4f}")
    assert rows["base kind"] == "train" and rows["base steps"] == "40"
    assert rows["base model"] == meta["training"]["base_model"]


def test_finetune_rejects_a_file_without_valid_example(trained_base, tmp_path, cli_in_process):
    instructions = tmp_path / "bad.txt"
    instructions.write_text(
        "### Instruction:\nno response here\n<|endoftext|>\n### Response:\nno instruction\n"
    )
    code, _, err = cli_in_process("finetune", trained_base, instructions, tmp_path / "out")
    assert code == 1
    assert err.splitlines() == [
        f"warning: {instructions}: 2 malformed block(s) skipped (1 with no ### Response:, "
        "1 with no ### Instruction:)",
        f"error: {instructions}: no valid example (each needs a ### Instruction: and a "
        "### Response: section, examples separated by <|endoftext|>)",
    ]
    assert not (tmp_path / "out").exists()


def test_finetune_rejects_fewer_examples_than_one_batch(trained_base, tmp_path, cli_in_process):
    instructions = write_instructions(tmp_path / "few.txt", PAIRS[:3])
    code, _, err = cli_in_process("finetune", trained_base, instructions, tmp_path / "out")
    assert code == 1
    assert err.splitlines() == [
        f"error: {instructions}: too few examples: it has 3 valid example(s), but one "
        "training batch of 4 and one validation example need at least 5 (lower "
        "--batch-size or add examples)"
    ]
    assert not (tmp_path / "out").exists()


def test_finetune_rejects_a_missing_base_model(tmp_path, cli_in_process):
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS)
    code, _, err = cli_in_process("finetune", tmp_path / "nothing", instructions, tmp_path / "out")
    assert code == 1
    assert err.splitlines() == [f"error: model {tmp_path / 'nothing'}: no such directory"]
    assert not (tmp_path / "out").exists()


def test_finetune_will_not_overwrite_its_base_model(trained_base, tmp_path, cli_in_process):
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS)
    before = (trained_base / "model.safetensors").read_bytes()
    code, _, err = cli_in_process("finetune", trained_base, instructions, trained_base)
    assert code == 1
    assert err.splitlines() == [
        f"error: {trained_base} is the base model's directory; fine-tune into another one"
    ]
    assert (trained_base / "model.safetensors").read_bytes() == before


def test_finetune_resume_continues_where_the_run_stopped(
    trained_base, tmp_path, cli_in_process, one_torch_thread
):
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS * 2)
    out = tmp_path / "tuned"
    common = ("--backend", "cpu", "--lr", 1e-2, "--eval-interval", 2, "--patience", 100)
    code, _, err = cli_in_process(
        "finetune", trained_base, instructions, out, *common, "--max-steps", 4
    )
    assert code == 0, err
    code, _, err = cli_in_process(
        "finetune", trained_base, instructions, out, *common, "--max-steps", 8, "--resume"
    )
    assert code == 0, err
    assert "resuming at step 4" in err
    steps = [m["step"] for m in read_metrics(out) if m["kind"] == "eval"]
    assert steps == [2, 4, 6, 8]
    assert json.loads((out / "model.json").read_text())["training"]["steps"] == 8


def test_finetune_rejects_a_batch_size_of_zero(trained_base, tmp_path, cli_in_process):
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS)
    code, _, err = cli_in_process(
        "finetune", trained_base, instructions, tmp_path / "out", "--batch-size", 0
    )
    assert code == 2
    assert err.splitlines() == ["error: --batch-size must be positive, got 0"]


def test_chat_asks_a_finetuned_model_exactly_as_finetuning_taught_it(finetuned, one_torch_thread):
    """The distribution of a reply's first token through chat is the one fine-tuning trained
    at the example's last prompt position, on the first turn and on a later one."""
    loaded = load_model(finetuned)
    tokenizer = loaded.tokenizer
    conversation = open_session(ChatOptions(model=str(finetuned), backend="cpu", dtype="float32"))
    session = conversation.session
    for turn, (question, answer) in enumerate(PAIRS[:2]):
        (example,), _ = tokenize_instructions(
            [Instruction(question, "", answer)], tokenizer, loaded.config.ctx_len
        )
        inputs, _ = example.inputs_and_targets()
        with torch.no_grad():
            trained = loaded.model(torch.from_numpy(inputs)[None])[0, example.prompt_len - 1]

        ids = conversation.turn(question)
        prompt = example.tokens[: example.prompt_len].tolist()
        # A later turn follows the end-of-text that ends every training example.
        assert ids == ([tokenizer.eot_id] if turn else []) + prompt
        session.push(ids)
        if turn == 0:
            torch.testing.assert_close(
                session.logits().softmax(-1), trained.softmax(-1), rtol=0, atol=1e-5
            )
            reply = list(session.sample(30, SamplingSettings(temperature=0)))
            assert tokenizer.decode(reply) == answer


def test_chat_continues_a_base_model_s_text_plainly(trained_base):
    conversation = open_session(ChatOptions(model=str(trained_base), backend="cpu"))
    tokenizer = conversation.session.tokenizer
    assert not conversation.follows_instructions
    assert conversation.turn("once upon a time") == tokenizer.encode("once upon a time")

"""LoRA fine-tuning: adapters on frozen weights, merged into a plain model directory.

The mechanics in-process (only the adapters train; merged weights compute what the adapted
model does), then the real CLI: what the directory holds, the merge on disk, chat from it,
and the resumes a LoRA run refuses. Exact resumption after a signal is in test_interrupts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from noodle.checkpoint import ModelDir, load_model
from noodle.config import LORA_TARGETS, LoraSettings, ModelConfig
from noodle.device import autocast
from noodle.inference import Session, generate
from noodle.instructions import format_prompt, load_examples, split_examples
from noodle.lora import (
    TARGET_PATHS,
    AdaptedModelDir,
    adapter_parameter_count,
    adapter_shapes,
    add_adapters,
    initial_adapters,
    merged_weights,
)
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.sampling import SamplingSettings
from noodle.train.loop import Trainer
from noodle.train.settings import TrainSettings
from tests.conftest import ONE_THREAD, PAIRS, TINY_CONFIG, run_noodle, write_instructions
from tests.tiny_runs import assert_same_tensors, directory_snapshot, read_metrics, saved_tensors

CPU = torch.device("cpu")
QUIET = Reporter(interactive=False, quiet=True)


def adapt(
    model: NoodleModel, settings: LoraSettings, seed: int, frozen_dtype: torch.dtype = torch.float32
) -> None:
    """Adapters on a model that holds its weights, at their starting values."""
    add_adapters(model, settings, frozen_dtype)
    with torch.no_grad():
        for name, value in initial_adapters(model.config, settings, seed).items():
            model.get_parameter(name).copy_(value)


def tiny_model(seed: int = 0) -> NoodleModel:
    torch.manual_seed(seed)
    return NoodleModel(ModelConfig(**TINY_CONFIG, vocab_size=128))


def test_every_target_names_a_layer_of_the_block():
    assert tuple(TARGET_PATHS) == LORA_TARGETS
    settings = LoraSettings(rank=4, alpha=8.0)
    model = tiny_model()
    adapt(model, settings, seed=0)
    block = model.blocks[0]
    assert all(block.get_submodule(path).lora_a.shape[0] == 4 for path in TARGET_PATHS.values())
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    assert shapes == dict(adapter_shapes(model.config, settings))
    assert sum(map(torch.Tensor.numel, model.parameters())) == (
        model.config.parameter_count() + adapter_parameter_count(model.config, settings)
    )


def test_an_adapted_model_starts_out_as_its_base_exactly(one_torch_thread):
    model = tiny_model()
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(idx)
        adapt(model, LoraSettings(rank=4, alpha=8.0), seed=0)
        assert torch.equal(model(idx), before)


def test_frozen_weights_kept_in_bfloat16_compute_exactly_what_autocast_computes(
    one_torch_thread,
):
    settings, idx = LoraSettings(rank=4, alpha=8.0), torch.randint(0, 128, (2, 16))
    logits, gradients = [], []
    for frozen_dtype in (torch.float32, torch.bfloat16):
        model = tiny_model()
        adapt(model, settings, seed=0, frozen_dtype=frozen_dtype)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("lora_b"):
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator()))
        with autocast(CPU, torch.bfloat16):
            output = model(idx)
        output.float().square().mean().backward()
        logits.append(output)
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert model.blocks[0].up.weight.dtype == model.head.bias.dtype == frozen_dtype
        assert model.tok_emb.weight.dtype == model.ln_f.weight.dtype == torch.float32

    assert torch.equal(logits[0], logits[1])
    assert_same_tensors(gradients[0], gradients[1], "gradients")


def test_merged_weights_are_base_plus_scaled_update_and_compute_the_adapted_logits(
    one_torch_thread,
):
    settings = LoraSettings(rank=4, alpha=6.0, targets=("qkv", "down"))
    model = tiny_model()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    adapt(model, settings, seed=0)
    with torch.no_grad():  # B starts at zero: give the update a value to merge
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(std=0.05)

    state = model.state_dict()
    adapters = {name: value for name, value in state.items() if name.endswith(("_a", "_b"))}
    merged = merged_weights(base, adapters, settings.scale)

    assert list(merged) == list(base)
    for name, value in base.items():
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_a" in state:
            update = state[f"{layer}.lora_b"] @ state[f"{layer}.lora_a"]
            torch.testing.assert_close(merged[name], value + 1.5 * update, rtol=1e-6, atol=1e-7)
            assert not torch.equal(merged[name], value)
        else:
            assert torch.equal(merged[name], value), name
    plain = NoodleModel(model.config)
    plain.load_state_dict(merged)
    idx = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        adapted_logits, merged_logits = model(idx), plain(idx)
        plain.load_state_dict(base)
        base_logits = plain(idx)
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapters do something


def test_a_lora_run_changes_its_adapters_and_not_one_bit_of_the_base(
    trained_base, tmp_path, one_torch_thread
):
    loaded = load_model(trained_base)
    model, settings = loaded.model, LoraSettings(rank=4, alpha=8.0)
    base = {name: value.clone() for name, value in model.state_dict().items()}
    adapt(model, settings, seed=0)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples, _ = load_examples(
        str(write_instructions(tmp_path / "qa.txt", PAIRS * 2)),
        loaded.tokenizer,
        loaded.config.ctx_len,
        QUIET,
    )
    train_settings = TrainSettings(max_steps=6, batch_size=4, lr=1e-2, eval_interval=3)
    train, validation = split_examples(examples, 4, 1, train_settings.seed, "qa.txt")
    trainer = Trainer(
        model,
        train,
        validation,
        train_settings,
        AdaptedModelDir(tmp_path / "out", settings, trained_base / "model.safetensors"),
        CPU,
        torch.float32,
        QUIET,
        identity={},
    )

    trainer.run()

    state = model.state_dict()
    assert set(state) == set(base) | set(adapters)
    for name, value in base.items():
        assert torch.equal(state[name], value), f"{name} changed"
    for name, value in adapters.items():
        assert not torch.equal(state[name], value), f"{name} did not train"
    # Only the adapters and their moments are in the resume state.
    resume = saved_tensors(tmp_path / "out" / "resume.safetensors")
    assert {k.removeprefix("model.") for k in resume if k.startswith("model.")} == set(adapters)


@dataclass
class LoraRun:
    base: Path
    out: Path
    common: list[str]  # the finetune command line but OUTPUT_DIR and the LoRA options
    lora: list[str]  # its LoRA options
    settings: LoraSettings

    def args(self, out: Path, lora: list[str]) -> list[str]:
        """The run's command line into `out`, with the LoRA options `lora`."""
        return [self.common[0], *self.common[1:3], str(out), *self.common[3:], *lora]


@pytest.fixture(scope="module")
def lora_run(trained_base, tmp_path_factory) -> LoraRun:
    """A LoRA fine-tune of the tiny base model through the real CLI: rank 4, alpha 6, on the
    attention's fused projection and the MLP's down projection."""
    work = tmp_path_factory.mktemp("lora")
    instructions = write_instructions(work / "qa.txt", PAIRS * 4)
    common = [*map(str, ("finetune", trained_base, instructions, "--backend", "cpu"))]
    common += ["--max-epochs", "10", "--lr", "1e-2", "--patience", "100"]
    lora = ["--lora-rank", "4", "--lora-alpha", "6", "--lora-targets", "down,qkv"]
    settings = LoraSettings(rank=4, alpha=6.0, targets=("qkv", "down"))
    run = LoraRun(trained_base, work / "tuned", common, lora, settings)
    result = run_noodle(*run.args(run.out, lora), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "LoRA rank 4, alpha 6, on qkv,down: 3,584 trained" in result.stderr
    return run


def test_the_directory_records_its_adapters_and_keeps_them_beside_the_merged_weights(lora_run):
    out = lora_run.out
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["status"] == "finished" and training["steps"] == 40
    assert training["base_model"] == str(lora_run.base.resolve())
    lora = training["lora"]
    base_bytes = (lora_run.base / "model.safetensors").read_bytes()
    assert lora["base_weights_sha256"] == hashlib.sha256(base_bytes).hexdigest()
    assert {k: v for k, v in lora.items() if k != "base_weights_sha256"} == {
        "rank": 4,
        "alpha": 6.0,
        "targets": ["qkv", "down"],
        "file": "adapters.safetensors",
        "trained_parameters": 3584,
    }
    config = load_model(out).config
    weights = saved_tensors(out / "model.safetensors")
    base = saved_tensors(lora_run.base / "model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in base.items()}
    adapters = saved_tensors(out / "adapters.safetensors")
    assert {k: tuple(v.shape) for k, v in adapters.items()} == dict(
        adapter_shapes(config, lora_run.settings)
    )
    # The resume state holds the adapters, their AdamW moments and the RNG: no base weight.
    resume = saved_tensors(out / "resume.safetensors")
    assert {k.removeprefix("model.") for k in resume if k.startswith("model.")} == set(adapters)
    assert not any(k.startswith("model.") and k.endswith(".weight") for k in resume)
    size = (out / "resume.safetensors").stat().st_size
    assert size < (out / "model.safetensors").stat().st_size / 5


def test_the_saved_weights_are_the_base_plus_the_scaled_adapters_of_the_best_step(lora_run):
    out = lora_run.out
    weights = saved_tensors(out / "model.safetensors")
    base = saved_tensors(lora_run.base / "model.safetensors")
    adapters = saved_tensors(out / "adapters.safetensors")
    merged = 0
    for name, value in base.items():
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_a" in adapters:
            update = adapters[f"{layer}.lora_b"] @ adapters[f"{layer}.lora_a"]
            torch.testing.assert_close(weights[name], value + 1.5 * update, rtol=1e-6, atol=1e-7)
            merged += 1
        else:
            assert torch.equal(weights[name], value), f"{name} is not the base's"
    assert merged == 4  # qkv and down of both blocks
    training = json.loads((out / "model.json").read_text())["training"]
    with safe_open(out / "adapters.safetensors", "pt") as reader:
        metadata = reader.metadata()
    assert metadata["best_step"] == str(training["best_step"])
    assert (metadata["rank"], metadata["alpha"], metadata["targets"]) == ("4", "6.0", "qkv,down")
    evals = [m["val_loss"] for m in read_metrics(out) if m["kind"] == "eval"]
    assert training["best_val_loss"] == min(evals) < evals[0] - 0.5  # the adapters learned


def greedy_answer(model: NoodleModel, tokenizer: object, question: str) -> str:
    session = Session(model, tokenizer)
    ids = generate(session, format_prompt(question), 30, SamplingSettings(temperature=0))
    return tokenizer.decode(list(ids))


def test_chat_answers_from_the_merged_directory_as_the_adapted_model_does(
    lora_run, cli_in_process, one_torch_thread
):
    loaded = load_model(lora_run.base)
    question = PAIRS[1][0]
    base_answer = greedy_answer(loaded.model, loaded.tokenizer, question)
    adapt(loaded.model, lora_run.settings, seed=0)
    with torch.no_grad():
        for name, value in saved_tensors(lora_run.out / "adapters.safetensors").items():
            loaded.model.get_parameter(name).copy_(value)
    adapted_answer = greedy_answer(loaded.model, loaded.tokenizer, question)

    code, out, err = cli_in_process(
        "chat", lora_run.out, "--prompt", question, "--temperature", 0, "--backend", "cpu"
    )

    assert code == 0, err
    assert out.strip() == adapted_answer.strip() != base_answer.strip()


@pytest.mark.parametrize(
    ("lora", "difference"),
    [
        (["--lora-rank", "8"], "--lora-rank was 4, now 8"),
        (["--lora-rank", "4", "--lora-alpha", "2"], "--lora-alpha was 6.0, now 2.0"),
        (
            ["--lora-rank", "4", "--lora-alpha", "6"],
            "--lora-targets was 'qkv,down', now 'qkv,proj,up,down'",
        ),
        ([], "the adapters: was LoRA rank 4, now none (every weight trained)"),
    ],
)
def test_resuming_with_other_adapters_is_refused(
    lora, difference, lora_run, tmp_path, cli_in_process
):
    out = Path(shutil.copytree(lora_run.out, tmp_path / "tuned"))
    before = directory_snapshot(out)

    code, _, err = cli_in_process(*lora_run.args(out, lora), "--resume")

    assert code == 1, err
    assert err.splitlines()[-1].startswith(
        f"error: cannot resume {out}: the run differs from the interrupted one in {difference}"
    )
    assert err.splitlines()[-1].endswith("; resume with the same corpus, model and options")
    assert directory_snapshot(out) == before


def test_a_lora_run_resumes_only_over_the_base_weights_it_started_from(
    trained_base, tmp_path, cli_in_process, one_torch_thread
):
    base = Path(shutil.copytree(trained_base, tmp_path / "base"))
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS)
    out = tmp_path / "tuned"
    args = ["finetune", base, instructions, out, "--backend", "cpu", "--lora-rank", 2]
    args += ["--eval-interval", 1, "--eval-batches", 1]
    code, _, err = cli_in_process(*args, "--max-steps", 1)
    assert code == 0, err
    # Without --lr, adapters take ten times full fine-tuning's rate: 2e-4 at batch 4.
    assert json.loads((out / "model.json").read_text())["training"]["lr"] == 2e-4
    code, _, err = cli_in_process(*args, "--max-steps", 2, "--resume")
    assert code == 0, err
    weights = saved_tensors(base / "model.safetensors")
    weights["head.bias"][0] += 1.0
    ModelDir(base).write_weights(weights)

    code, _, err = cli_in_process(*args, "--max-steps", 3, "--resume")

    assert code == 1
    assert err.splitlines()[-1] == (
        f"error: cannot resume {out}: the run differs from the interrupted one in the base "
        "model's weights: they changed since the run started, and its resume state holds "
        "only adapters trained on the old ones; resume with the same corpus, model and options"
    )

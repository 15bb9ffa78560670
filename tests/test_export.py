"""`noodle export`: the transformers model directory loads offline with transformers, gives
noodle's logits, and generate() (with transformers' own cache) gives `noodle chat`'s tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from noodle.checkpoint import load_model
from noodle.cli import main
from noodle.export import tokenizer_license
from noodle.tokenizer import load_tokenizer

PROMPT = "once upon a time tom found"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def transformers(tmp_path_factory):
    """transformers, offline, with its caches (the remote code's copy) in a temporary
    directory. Both are read when it is first imported, which happens here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        import huggingface_hub
        import transformers

        assert huggingface_hub.constants.HF_HUB_OFFLINE, "imported before going offline"
        yield transformers


@pytest.fixture(scope="module")
def exported(trained_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-noodle"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(trained_base), str(out)])
    assert exit_info.value.code == 0
    return out


@pytest.fixture(scope="module")
def hf_model(transformers, exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)


def test_the_directory_has_its_model_type_code_weights_tokenizer_and_card(exported, trained_base):
    config = json.loads((exported / "config.json").read_text())
    metadata = json.loads((trained_base / "model.json").read_text())
    card = (exported / "README.md").read_text()

    assert config["model_type"] == "noodle"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_noodle.NoodleForCausalLM"
    for name in ("modeling_noodle.py", "configuration_noodle.py", "model.safetensors"):
        assert (exported / name).is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (exported / name).is_file()
    assert f"| parameters | {metadata['parameters']:,} |" in card
    assert f"| steps | {metadata['training']['steps']} |" in card
    assert "its license is that of its source" in card  # the test tokenizer is not bundled


def test_the_bundled_tokenizers_license_is_named():
    assert "Apache License 2.0" in tokenizer_license(load_tokenizer())


def test_transformers_gives_noodles_logits_and_never_a_padded_id(
    transformers, hf_model, exported, trained_base
):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ours = load_model(trained_base)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    vocab = ours.tokenizer.vocab_size

    with torch.no_grad():
        theirs = hf_model(ids, labels=ids)
        expected = ours.model(ids)

    assert ids[0].tolist() == ours.tokenizer.encode(PROMPT)
    assert hf_model.dtype == torch.float32
    assert (theirs.logits[..., :vocab] - expected[..., :vocab]).abs().max() < 1e-4
    assert vocab < ours.config.vocab_size
    assert torch.isneginf(theirs.logits[..., vocab:]).all()
    next_token_loss = F.cross_entropy(expected[0, :-1, :vocab], ids[0, 1:])
    assert theirs.loss.item() == pytest.approx(next_token_loss.item(), abs=1e-5)


def test_greedy_generate_with_transformers_cache_gives_noodle_chats_tokens(
    transformers, hf_model, exported, trained_base, cli_in_process
):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    calls = []
    hook = hf_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs["cache"])),
        with_kwargs=True,
    )
    try:
        output = hf_model.generate(
            **inputs, max_new_tokens=20, do_sample=False, repetition_penalty=1.1
        )
    finally:
        hook.remove()
    generated = output[0, inputs.input_ids.shape[1] :].tolist()

    code, stdout, stderr = cli_in_process(
        *("chat", trained_base, "--prompt", PROMPT, "--temperature", 0, "--max-tokens", 20),
        *("--repetition-penalty", 1.1, "--backend", "cpu", "--dtype", "float32"),
    )

    assert code == 0, stderr
    assert len(generated) == 20 and tokenizer.eos_token_id not in generated
    assert stdout == tokenizer.decode(generated) + "\n"
    # One pass over the prompt, then one position per token, through a DynamicCache.
    assert [length for length, _ in calls] == [inputs.input_ids.shape[1]] + [1] * 19
    assert all(isinstance(cache, transformers.DynamicCache) for _, cache in calls[1:])


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(
    transformers, hf_model, exported
):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported, padding_side="left")
    prompts = ["tom found a", "once upon a time mia found a big dog in the"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    together = hf_model.generate(**batch, max_new_tokens=8, do_sample=False)

    assert batch.attention_mask[0].tolist().count(0) > 0  # the first prompt is padded
    for row, prompt in enumerate(prompts):
        alone = tokenizer(prompt, return_tensors="pt")
        expected = hf_model.generate(**alone, max_new_tokens=8, do_sample=False)
        assert together[row, -8:].tolist() == expected[0, -8:].tolist()


def test_export_fills_an_empty_directory_and_leaves_nothing_beside_it(
    trained_base, tmp_path, cli_in_process
):
    out = tmp_path / "empty"
    out.mkdir()

    code, _, stderr = cli_in_process("export", trained_base, out)

    assert code == 0, stderr
    assert (out / "config.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["empty"]

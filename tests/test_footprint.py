"""Memory estimates from a config alone, and the refusal that says what would fit."""

from __future__ import annotations

import pytest
import torch

from noodle.config import PRESETS, LoraSettings, ModelConfig
from noodle.errors import NoodleError
from noodle.footprint import MemoryNeed, inference_need, require_memory, training_need

CPU = torch.device("cpu")
GB = 10**9


def test_training_needs_sixteen_bytes_a_parameter_and_activations_per_sequence():
    config = PRESETS["somen"]
    need = training_need(config, batch_size=8, activation_bytes=4)
    assert need.fixed["weights, gradients and optimizer state"] == 16 * config.parameter_count()
    assert need.total == sum(need.fixed.values()) + 8 * need.per_sequence
    halved = training_need(config, batch_size=8, activation_bytes=2)
    assert halved.per_sequence < need.per_sequence  # bfloat16 activations


def test_lora_training_needs_the_frozen_weights_once_and_sixteen_bytes_an_adapter_weight():
    config = PRESETS["soba"]
    full = training_need(config, batch_size=4, activation_bytes=2)
    lora = training_need(config, 4, 2, adapters=LoraSettings(rank=16, alpha=32.0))
    # Each block: A and B of qkv (1024 in, 6144 out), proj (2048, 1024), up (1024, 4096)
    # and down (4096, 1024), 16 columns or rows each.
    adapters = 28 * 16 * (1024 + 6144 + 2048 + 1024 + 1024 + 4096 + 4096 + 1024)
    # The embedding and norms in float32, the Linear layers in bfloat16.
    float32 = 50304 * 1024 + (4 * 28 + 2) * 1024
    linear = config.parameter_count() - float32
    assert lora.fixed["frozen weights"] == 4 * float32 + 2 * linear
    assert lora.fixed["adapters, their gradients and optimizer state"] == 16 * adapters
    assert lora.per_sequence == full.per_sequence
    assert sum(lora.fixed.values()) < 0.2 * sum(full.fixed.values())
    # Sharded over two processes (FSDP), the frozen weights stay in float32.
    sharded = training_need(config, 4, 2, shards=2, adapters=LoraSettings(rank=16, alpha=32.0))
    assert sharded.fixed["frozen weights"] == 4 * config.parameter_count() // 2
    assert sharded.fixed["adapters, their gradients and optimizer state"] == 16 * adapters // 2


def test_chat_needs_the_weights_twice_on_the_cpu_and_a_key_value_cache():
    config = PRESETS["soba"]
    on_cpu, on_gpu = (inference_need(config, "to chat", cpu) for cpu in (True, False))
    assert on_cpu.fixed["weights"] == 2 * on_gpu.fixed["weights"] == 8 * config.parameter_count()
    assert on_cpu.fixed["key/value cache"] == 2 * 28 * 1024 * 16 * 128 * 4


def test_what_fits_is_refused_never():
    require_memory(PRESETS["udon"], lambda c: training_need(c, 8, 4), "model udon", CPU, 10**15)
    require_memory(PRESETS["udon"], lambda c: training_need(c, 8, 4), "model udon", CPU, None)


def test_a_refusal_says_what_it_needs_what_there_is_and_what_would_fit():
    config = PRESETS["soba"]
    need = training_need(config, 8, 4)
    available = sum(need.fixed.values()) + 3 * need.per_sequence + 1
    with pytest.raises(NoodleError) as refused:
        require_memory(config, lambda c: training_need(c, 8, 4), "model soba", CPU, available)
    message = str(refused.value)
    assert message.startswith(
        f"model soba ({config.parameter_count():,} parameters) needs about "
        f"{need.total / GB:,.1f} GB to train at batch size 8 (weights, gradients and optimizer "
        f"state {need.fixed['weights, gradients and optimizer state'] / GB:,.1f} GB, activations "
    )
    assert message.endswith(
        f"but cpu has {available / GB:,.1f} GB available; --batch-size 3 would fit; presets "
        f"that fit: somen ({training_need(PRESETS['somen'], 8, 4).total / GB:,.1f} GB), "
        f"harusame ({training_need(PRESETS['harusame'], 8, 4).total / GB:,.1f} GB)"
    )


def test_when_nothing_fits_it_says_so():
    config = ModelConfig(vocab_size=50304)
    with pytest.raises(NoodleError, match=r"available; no preset fits$"):
        require_memory(config, lambda c: inference_need(c, "to chat", True), "model x", CPU, 1000)


def test_largest_batch_counts_what_is_left_after_the_fixed_part():
    need = MemoryNeed("to train", {"weights": 100}, per_sequence=30, batch_size=8)
    assert [need.largest_batch(available) for available in (90, 129, 130, 400)] == [0, 0, 1, 10]


def test_a_process_of_a_sharded_run_needs_its_share_and_a_hint_speaks_of_the_global_batch():
    config = PRESETS["udon"]
    whole = training_need(config, 1, 2)
    shared = training_need(config, 1, 2, shards=8, checkpointing=True, batch_parts=64)
    states = "weights, gradients and optimizer state"
    assert shared.fixed[states] == 16 * -(-config.parameter_count() // 8)
    assert shared.per_sequence < whole.per_sequence / 10  # each block keeps only its input
    assert shared.purpose == "to train at batch size 64"
    room = sum(shared.fixed.values()) + 2 * shared.per_sequence
    with pytest.raises(NoodleError, match=r"--batch-size 128 would fit"):
        require_memory(
            config,
            lambda c: training_need(c, 4, 2, shards=8, checkpointing=True, batch_parts=64),
            "model udon",
            CPU,
            room,
        )

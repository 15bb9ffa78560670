"""How much memory a model needs, estimated from its config alone (nothing is built), and
how much the device has: a model too large is refused before any of it is made, with what
it needs, what the device has, and what would fit.

The estimates are deliberately simple: the parameters' bytes are exact, the activations a
rough count of what the forward pass keeps for the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from noodle.config import PRESETS, LoraSettings, ModelConfig
from noodle.errors import NoodleError
from noodle.lora import adapter_parameter_count

FLOAT32_BYTES = 4
# Weights, gradients and AdamW's two moments, all float32. Muon keeps one moment, and on a
# GPU its recorded update holds a stacked copy of the gradients besides: about as much.
TRAINING_BYTES_PER_PARAMETER = 4 * FLOAT32_BYTES
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryNeed:
    """What a model needs in memory for one use: fixed parts (name -> bytes) and, for work
    in batches, the bytes each sequence of the batch adds."""

    purpose: str  # "to train at batch size 8", "to chat", ...
    fixed: dict[str, int]
    per_sequence: int = 0
    batch_size: int = 1
    # The global batch is this many times batch_size: shared over processes and
    # micro-batches (each process holds one micro-batch at a time).
    batch_parts: int = 1

    @property
    def total(self) -> int:
        return sum(self.fixed.values()) + self.per_sequence * self.batch_size

    def parts(self) -> dict[str, int]:
        if not self.per_sequence:
            return self.fixed
        return {**self.fixed, "activations": self.per_sequence * self.batch_size}

    def largest_batch(self, available: int) -> int:
        """The largest batch size that fits in `available` bytes (0: not even one)."""
        room = available - sum(self.fixed.values())
        return max(0, room // self.per_sequence) if self.per_sequence else 0


def rotary_bytes(config: ModelConfig) -> int:
    """The rotary tables, with the float64 tables they are computed from."""
    return config.ctx_len * config.head_dim * (2 * FLOAT32_BYTES + 3 * 8)


def activation_elements_per_token(config: ModelConfig) -> int:
    """What one block keeps per token for the backward pass: the layer norms' inputs and
    outputs, the residual stream, queries, keys, values and their normed and rotated copies,
    the attention output and the MLP's two hidden activations."""
    inner = config.n_heads * config.head_dim
    return 8 * config.emb_dim + 6 * inner + 2 * config.hidden_dim


def kept_bytes_per_token(
    config: ModelConfig, block_bytes: int, activation_bytes: int, checkpointing: bool
) -> int:
    """What the forward pass keeps per token for the backward pass, given what one block
    keeps (`block_bytes`): every block's activations or, with activation checkpointing,
    each block's input and the activations of the one block being recomputed."""
    if checkpointing:
        return config.n_layers * config.emb_dim * activation_bytes + block_bytes
    return config.n_layers * block_bytes


def logits_bytes_per_token(config: ModelConfig, activation_bytes: int) -> int:
    """The logits, their float32 copy for the loss, and its gradient."""
    return config.vocab_size * (activation_bytes + 2 * FLOAT32_BYTES)


def training_need(
    config: ModelConfig,
    batch_size: int,
    activation_bytes: int,
    shards: int = 1,
    checkpointing: bool = False,
    batch_parts: int = 1,
    adapters: LoraSettings | None = None,
) -> MemoryNeed:
    """Training with float32 weights and AdamW; activations of `activation_bytes` each (2
    under bfloat16/float16 autocast). One process's share: `batch_size` sequences at a time
    of a global batch of `batch_parts` times as many, the weights and their state split in
    `shards` (FSDP). With activation checkpointing a block keeps only its input, and one
    block's activations exist at a time, recomputed in the backward pass.

    With LoRA `adapters` only they have gradients and optimizer state; the frozen weights
    need their own bytes alone, those of Linear layers in the activations' precision unless
    sharded (see `lora.add_adapters`). The activations are much the same: the gradient still flows
    back through every layer."""
    parameters = config.parameter_count()
    if adapters is None:
        weights = {
            "weights, gradients and optimizer state": -(-parameters // shards)
            * TRAINING_BYTES_PER_PARAMETER
        }
    else:
        # The embedding and the norms stay in float32.
        float32 = config.vocab_size * config.emb_dim + (4 * config.n_layers + 2) * config.emb_dim
        linear_bytes = activation_bytes if shards == 1 else FLOAT32_BYTES
        frozen = float32 * FLOAT32_BYTES + (parameters - float32) * linear_bytes
        trained = adapter_parameter_count(config, adapters)
        weights = {
            "frozen weights": -(-frozen // shards),
            "adapters, their gradients and optimizer state": -(-trained // shards)
            * TRAINING_BYTES_PER_PARAMETER,
        }
    block_bytes = activation_elements_per_token(config) * activation_bytes
    per_token = kept_bytes_per_token(config, block_bytes, activation_bytes, checkpointing)
    per_token += logits_bytes_per_token(config, activation_bytes)
    return MemoryNeed(
        f"to train at batch size {batch_size * batch_parts}",
        {**weights, "rotary tables": rotary_bytes(config)},
        per_sequence=config.ctx_len * per_token,
        batch_size=batch_size,
        batch_parts=batch_parts,
    )


def inference_need(
    config: ModelConfig, purpose: str, on_cpu: bool, batch_size: int = 0
) -> MemoryNeed:
    """Loading the float32 weights (on the CPU a second copy while they are read) and a
    key/value cache of one context window (chat, batch_size 0) or the logits of
    `batch_size` windows (eval)."""
    weights = config.parameter_count() * FLOAT32_BYTES
    fixed = {"weights": weights * (2 if on_cpu else 1), "rotary tables": rotary_bytes(config)}
    if not batch_size:
        cache = 2 * config.n_layers * config.ctx_len * config.n_heads * config.head_dim
        return MemoryNeed(purpose, {**fixed, "key/value cache": cache * FLOAT32_BYTES})
    # Without gradients a block's activations are freed as the next one runs: the logits
    # (and their float32 copy for the loss) dominate.
    per_token = 2 * config.vocab_size + activation_elements_per_token(config)
    return MemoryNeed(purpose, fixed, config.ctx_len * per_token * FLOAT32_BYTES, batch_size)


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # absent, or "max" (no limit)
        return None


def cpu_available() -> int | None:
    """MemAvailable of /proc/meminfo, lowered to what is left under the cgroup's memory
    limit (a container); None where neither can be read."""
    available = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit, used = read_int(CGROUP / "memory.max"), read_int(CGROUP / "memory.current")
    if limit is not None and used is not None:
        left = max(0, limit - used)
        available = left if available is None else min(available, left)
    return available


def available_memory(device: torch.device) -> int | None:
    """The bytes free for a new model on `device`; None when that cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return None  # unified memory that the system pages: no honest number
    return cpu_available()


def size_text(size: float) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e6:,.0f} MB"


def require_memory(
    config: ModelConfig,
    need_for: Callable[[ModelConfig], MemoryNeed],
    name: str,
    device: torch.device,
    available: int | None,
) -> None:
    """Refuse `config` (called `name` in messages) when `need_for(config)` exceeds the
    `available` bytes of `device`, saying what it needs, what there is and what would fit:
    a smaller batch size, or the presets that fit."""
    need = need_for(config)
    if available is None or need.total <= available:
        return
    parts = ", ".join(
        f"{part} {size_text(size)}"
        for part, size in need.parts().items()
        if size >= need.total / 100  # the parts that matter
    )
    hints = []
    batch = need.largest_batch(available)
    if 0 < batch < need.batch_size:
        hints.append(f"--batch-size {batch * need.batch_parts} would fit")
    fitting = []
    for preset, preset_config in PRESETS.items():
        size = need_for(replace(preset_config, vocab_size=config.vocab_size)).total
        if size <= available:
            fitting.append(f"{preset} ({size_text(size)})")
    hints.append(f"presets that fit: {', '.join(fitting)}" if fitting else "no preset fits")
    raise NoodleError(
        f"{name} ({config.parameter_count():,} parameters) needs about {size_text(need.total)} "
        f"{need.purpose} ({parts}), but {device} has {size_text(available)} available; "
        f"{'; '.join(hints)}"
    )


def require_inference_memory(
    config: ModelConfig, name: str, purpose: str, device: torch.device, batch_size: int = 0
) -> None:
    """Refuse to load `config` for chat (batch_size 0) or eval where it cannot fit."""
    on_cpu = device.type == "cpu"
    require_memory(
        config,
        lambda c: inference_need(c, purpose, on_cpu, batch_size),
        name,
        device,
        available_memory(device),
    )

"""Low-rank adaptation (LoRA): fine-tuning through small trainable adapters on frozen Linear
layers, and merging them into the weights.

`add_adapters` freezes a model and turns the target layers of its blocks into `LoraLinear`s:
each keeps its weight and bias under the same names and gains `lora_a` and `lora_b` beside
them, so the model module itself knows nothing of adapters. A LoRA run's output directory
(`AdaptedModelDir`) holds the merged weights, W + scale · B A, as its model.safetensors: a
plain model directory that chat, eval and export load as any other; the adapters alone are
kept beside them.

The adapters are ordinary parameters of the blocks they sit in: a replicated model
(DistributedDataParallel) averages their gradients as it would any other's, and a sharded
one (FSDP) shards them with the rest of their block. Their starting values are whole
tensors drawn from the run's seed (`initial_adapters`), the same however the model is laid
out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from noodle.checkpoint import ADAPTERS, BestWeights, ModelDir, best_metadata, write_safetensors
from noodle.config import ModelConfig
from noodle.files import atomic_write
from noodle.model import weight_shapes
from noodle.train.settings import LoraSettings

# Where each target of LoraSettings (settings.LORA_TARGETS) is inside a block.
TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "up": "up", "down": "down"}
ADAPTER_A, ADAPTER_B = "lora_a", "lora_b"


class LoraLinear(nn.Linear):
    """A Linear layer plus a low-rank update: x Wᵀ + b + scale · (x Aᵀ) Bᵀ, with W and b
    the adapted layer's own parameters. The update runs as two thin products rather than
    being added to W, so that no gradient of W's size is ever formed."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float) -> None:
        # Built on the meta device, then given the adapted layer's parameters: nothing is
        # allocated for the weights it replaces at once.
        has_bias = linear.bias is not None
        super().__init__(linear.in_features, linear.out_features, has_bias, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, **like))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a), self.lora_b)
        return super().forward(x) + update * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def add_adapters(model: nn.Module, settings: LoraSettings) -> None:
    """Freeze every parameter of `model` (a NoodleModel, on any device, the meta device
    too) and give the target layers of each block adapters, trainable and not yet
    initialised (see `initial_adapters`)."""
    model.requires_grad_(False)
    for block in model.blocks:
        for target in settings.targets:
            owner_path, _, name = TARGET_PATHS[target].rpartition(".")
            owner = block.get_submodule(owner_path)
            setattr(owner, name, LoraLinear(getattr(owner, name), settings.rank, settings.scale))


def adapter_shapes(config: ModelConfig, settings: LoraSettings) -> Iterator[tuple[str, tuple]]:
    """The names and shapes of the adapters `add_adapters` gives a model of `config`, in
    state-dict order, from the config alone."""
    targets = tuple(f".{TARGET_PATHS[target]}.weight" for target in settings.targets)
    for name, shape in weight_shapes(config):
        if name.startswith("blocks.") and name.endswith(targets):
            layer, (outputs, inputs) = name.removesuffix("weight"), shape
            yield layer + ADAPTER_A, (settings.rank, inputs)
            yield layer + ADAPTER_B, (outputs, settings.rank)


def adapter_parameter_count(config: ModelConfig, settings: LoraSettings) -> int:
    return sum(math.prod(shape) for _, shape in adapter_shapes(config, settings))


def initial_adapters(
    config: ModelConfig, settings: LoraSettings, seed: int
) -> dict[str, torch.Tensor]:
    """The adapters' starting values, whole CPU tensors drawn from `seed` alone: A uniform
    in ±1/√inputs (nn.Linear's own initialisation), B zero, so that the adapted model
    starts out computing exactly what the base model does."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name, shape in adapter_shapes(config, settings):
        if name.endswith(ADAPTER_A):
            bound = 1 / math.sqrt(shape[1])
            values[name] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
        else:
            values[name] = torch.zeros(shape)
    return values


def adapt(model: nn.Module, settings: LoraSettings, seed: int) -> None:
    """`add_adapters`, with the adapters set to their starting values."""
    add_adapters(model, settings)
    with torch.no_grad():
        for name, value in initial_adapters(model.config, settings, seed).items():
            model.get_parameter(name).copy_(value)


def is_adapter(name: str) -> bool:
    return name.rpartition(".")[2] in (ADAPTER_A, ADAPTER_B)


def merged_weights(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an adapted model's (whole tensors): each adapted
    weight W becomes W + scale · B A, computed in float32, and the adapters are left out."""
    merged = {}
    for name, value in state.items():
        layer, _, kind = name.rpartition(".")
        if is_adapter(name):
            continue
        if kind == "weight" and f"{layer}.{ADAPTER_A}" in state:
            a, b = state[f"{layer}.{ADAPTER_A}"].float(), state[f"{layer}.{ADAPTER_B}"].float()
            value = (value.float() + scale * (b @ a)).to(value.dtype)
        merged[name] = value
    return merged


class AdaptedModelDir(ModelDir):
    """The output directory of a LoRA run. Given the adapted model's state dict as its
    weights, it writes the merged weights as the model's (so the directory stays a plain
    model directory) and the adapters alone beside them (ADAPTERS, with their settings),
    both marked with the evaluation they are the best of. The adapters go first: a crash
    between the two writes leaves the model's weights those model.json describes."""

    def __init__(self, path: str | Path, settings: LoraSettings) -> None:
        super().__init__(path)
        self.settings = settings

    def write_weights(
        self, tensors: dict[str, torch.Tensor], best: BestWeights | None = None
    ) -> None:
        adapters = {name: value for name, value in tensors.items() if is_adapter(name)}
        metadata = {
            "rank": str(self.settings.rank),
            "alpha": repr(self.settings.alpha),
            "targets": ",".join(self.settings.targets),
            **best_metadata(best),
        }
        atomic_write(
            self.file(ADAPTERS), lambda handle: write_safetensors(handle, adapters, metadata)
        )
        super().write_weights(merged_weights(tensors, self.settings.scale), best)

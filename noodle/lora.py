"""Low-rank adaptation (LoRA): fine-tuning through small trainable adapters on frozen Linear
layers, and merging them into the weights.

`add_adapters` freezes a model and turns the target layers of its blocks into `LoraLinear`s:
each keeps its weight and bias under the same names and gains `lora_a` and `lora_b` beside
them, so the model module itself knows nothing of adapters. A LoRA run trains and saves
the adapters alone: its output directory (`AdaptedModelDir`) merges them into the base
model's weights as read from the base's own file, W + scale · B A, and writes those as its
model.safetensors (a plain model directory that chat, eval and export load as any other),
keeping the adapters beside them. The frozen weights in memory are then free to be kept
in the precision they compute in (see `add_adapters`).

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
from safetensors.torch import load_file
from torch import nn

from noodle.checkpoint import ADAPTERS, BestWeights, ModelDir, best_metadata, write_safetensors
from noodle.config import LoraSettings, ModelConfig
from noodle.files import atomic_write
from noodle.model import weight_shapes

# Where each of config.LORA_TARGETS is inside a block.
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
        # Trained, so in float32 whatever the frozen weight is kept in.
        device = linear.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=device))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a), self.lora_b)
        return super().forward(x) + update * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def add_adapters(
    model: nn.Module, settings: LoraSettings, frozen_dtype: torch.dtype = torch.float32
) -> None:
    """Freeze every parameter of `model` (a NoodleModel, on any device, the meta device
    too), keep the weights and biases of its Linear layers in `frozen_dtype`, and give the
    target layers of each block adapters, trainable and not yet initialised (see
    `initial_adapters`).

    Give `frozen_dtype` the autocast precision: under bfloat16 or float16 autocast a Linear
    layer computes in it whatever its weights are stored in, so storing them so gives the
    very same results, in half the memory and without the cast copy autocast would
    otherwise keep for the backward pass. (The embedding and the norms stay in float32:
    the residual stream keeps its precision.)"""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for name in ("weight", "bias"):
                frozen = getattr(module, name)
                if frozen is not None:
                    setattr(module, name, nn.Parameter(frozen.to(frozen_dtype), False))
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


def merged_weights(
    base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """The base model's state dict with `adapters` merged in (whole tensors): each adapted
    weight W becomes W + scale · B A, computed in float32; the rest is the base's."""
    merged = {}
    for name, value in base.items():
        layer = name.removesuffix(".weight")
        if f"{layer}.{ADAPTER_A}" in adapters:
            a, b = adapters[f"{layer}.{ADAPTER_A}"], adapters[f"{layer}.{ADAPTER_B}"]
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        merged[name] = value
    return merged


class AdaptedModelDir(ModelDir):
    """The output directory of a LoRA run, whose base model's weights are the file `base`.
    Given the adapters as the weights to write (what the run trains), it writes them merged
    into the base's weights as the model's, so that the directory is a plain model
    directory, and alone beside them (ADAPTERS, with their settings), both marked with the
    evaluation they are the best of. The adapters go first: a crash between the two writes
    leaves the model's weights those model.json describes."""

    def __init__(self, path: str | Path, settings: LoraSettings, base: Path) -> None:
        super().__init__(path)
        self.settings, self.base = settings, base

    def write_weights(
        self, adapters: dict[str, torch.Tensor], best: BestWeights | None = None
    ) -> None:
        metadata = {
            "rank": str(self.settings.rank),
            "alpha": repr(self.settings.alpha),
            "targets": ",".join(self.settings.targets),
            **best_metadata(best),
        }
        atomic_write(
            self.file(ADAPTERS), lambda handle: write_safetensors(handle, adapters, metadata)
        )
        # The weights the run started from: their hash is part of the run's identity.
        base = load_file(self.base)
        super().write_weights(merged_weights(base, adapters, self.settings.scale), best)

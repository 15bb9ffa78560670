"""Processes and model wrapping: the one place that knows whether a run spans several
processes (torchrun) and how the model is prepared for the training step.

Today a run is one process: several are refused, since each would train alone and write
the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from noodle.errors import NoodleError


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Parallel:
        """The processes of this run, from the variables torchrun sets."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            raise NoodleError(
                f"{world_size} processes (torchrun) are not supported yet: run one process "
                "per machine; distributed training is planned"
            )
        return cls(local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def prepare_model(self, model: nn.Module, compile_mode: str | None) -> nn.Module:
        """The module the training step calls: `model` itself, or compiled (sharing its
        parameters, so saving goes through `checkpoint.unwrap`)."""
        return model if compile_mode is None else torch.compile(model, mode=compile_mode)

"""Optimizers, the learning-rate schedule and the one optimizer step.

The step works for any set of torch optimizers: it clips the gradients to a total norm
and, when the loss or the gradient is not finite, skips the whole update (no optimizer
changes a weight or its own state). Fused AdamW and `BatchedMuon` get both for free: they
divide the gradients by `grad_scale` and skip where `found_inf` is set (the protocol
GradScaler uses), so clipping costs no extra pass over the gradients and the guard no host
sync. Any other optimizer gets its gradients divided in one foreach pass and costs one host
read of the guard per step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from noodle.parallel import replicated_value
from noodle.train.muon import BatchedMuon
from noodle.train.settings import TrainSettings

MIN_LR_FRACTION = 0.1
ADAMW_BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class Schedule:
    """The learning rate as a fraction of the peak, step by step: a linear warm-up, then
    either a cosine decay to `min_fraction` at `total_steps` ("cosine"), or a flat stretch
    and a linear decay over the last `decay_fraction` of the run ("wsd": warm-up, stable,
    decay).

    It is part of the run and saved with its resume state. A run resumed with another
    length keeps the rate it has reached and re-plans only the rest: from the step it
    resumes at, the decay goes from that rate to the minimum at the new last step (see
    `replan`). A "wsd" run whose validation loss stops improving at the peak rate begins
    its decay there (see `decay_now`). Plain JSON via `to_dict`/`from_dict`.
    """

    kind: str
    warmup_steps: int
    total_steps: int
    decay_fraction: float = 0.2
    min_fraction: float = MIN_LR_FRACTION
    # Set by `replan` once a decay had begun: the decay restarts here, from `decay_from`.
    decay_from_step: int | None = None
    decay_from: float = 1.0
    # Set by `decay_now`: the length the run was planned for before a plateau ended it
    # sooner (a resume asking for that length again keeps the shorter plan).
    requested_steps: int | None = None

    @classmethod
    def plan(cls, settings: TrainSettings, total_steps: int) -> Schedule:
        warmup = min(settings.warmup_steps, max(1, total_steps // 10))
        return cls(settings.schedule, warmup, total_steps, settings.decay_fraction)

    def decay_start(self) -> int:
        if self.decay_from_step is not None:
            return self.decay_from_step
        if self.kind == "wsd":
            decay_steps = round(self.decay_fraction * self.total_steps)
            return max(self.warmup_steps, self.total_steps - decay_steps)
        return self.warmup_steps

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = self.decay_start()
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_fraction + (self.decay_from - self.min_fraction) * shape

    def replan(self, step: int, total_steps: int) -> Schedule:
        """This schedule for a run that, at `step`, is given `total_steps` in all.

        Before any decay (in the warm-up, or in the flat stretch of "wsd" where the new
        plan's decay has not begun either) that is simply the plan for the new length.
        Otherwise the rate reached at `step` is kept and decays to the minimum at the new
        last step: a finished run extended further goes on at its minimum rate.
        """
        if total_steps in (self.total_steps, self.requested_steps):
            return self
        fresh = replace(
            self,
            total_steps=total_steps,
            decay_from_step=None,
            decay_from=1.0,
            requested_steps=None,
        )
        if step < self.decay_start() and step < fresh.decay_start():
            return fresh
        return replace(
            self,
            total_steps=total_steps,
            decay_from_step=step,
            decay_from=self.factor(step),
            requested_steps=None,
        )

    def decays_early(self, step: int) -> bool:
        """Whether a plateau at `step` should begin the decay (see `decay_now`) rather than
        stop the run: a "wsd" run at its peak rate, past the warm-up and before the decay."""
        return self.kind == "wsd" and self.warmup_steps <= step < self.decay_start()

    def decay_now(self, step: int) -> Schedule:
        """This "wsd" schedule with its decay begun at `step`, over its planned decay length
        (`decay_fraction` of the run), the run ending with it. At the peak rate the loss
        settles on a plateau that only the decay takes it below; stopping there, as a
        cosine run may, would keep weights that the decay would still improve a lot."""
        decay_steps = self.total_steps - self.decay_start()
        return replace(
            self,
            total_steps=step + decay_steps,
            decay_from_step=step,
            decay_from=self.factor(step),
            requested_steps=self.requested_steps or self.total_steps,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        return cls(**data)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the Linear layers inside the transformer blocks (attention and MLP
    projections): the matrices Muon orthogonalises. The embedding and the output layer,
    whose rows are looked up or scored one token at a time, are not among them."""
    return [
        module.weight
        for module in model.blocks.modules()
        if isinstance(module, nn.Linear) and module.weight.requires_grad
    ]


def adamw(groups: list[dict], fused: bool = True) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, betas=ADAMW_BETAS, fused=fused)


def decay_groups(parameters: list[nn.Parameter], settings: TrainSettings) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), not on biases or norms."""
    return [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizers(model: nn.Module, settings: TrainSettings) -> dict[str, torch.optim.Optimizer]:
    """The optimizers of `settings.optimizer`, by name (each name is a section of the resume
    state). Every parameter group carries its `peak_lr`, which the schedule scales."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        optimizers: dict[str, torch.optim.Optimizer] = {
            "adamw": adamw(decay_groups(trainable, settings))
        }
    elif settings.optimizer == "muon":
        matrices = hidden_matrices(model)
        chosen = {id(p) for p in matrices}
        rest = [p for p in trainable if id(p) not in chosen]
        # Moonshot's scaling gives Muon's updates AdamW's RMS, so one peak learning rate
        # and weight decay serve both.
        muon = BatchedMuon(
            matrices, weight_decay=settings.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        optimizers = {"muon": muon, "adamw": adamw(decay_groups(rest, settings))}
    else:
        raise ValueError(f"unknown optimizer {settings.optimizer!r}")
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"] = settings.lr
    return optimizers


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` divides by `grad_scale` and skips on `found_inf` itself."""
    fused_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(
        optimizer.defaults.get("fused")
    )
    return fused_adam or isinstance(optimizer, BatchedMuon)


class LossScale:
    """Dynamic loss scaling for float16: the loss is multiplied by `scale` before the
    backward pass so that small gradients do not underflow to zero in float16; the step
    divides it out again. The scale halves after a step whose gradients overflowed (that
    step is skipped) and doubles after `GROWTH_INTERVAL` good steps in a row. Device
    tensors only: no host sync."""

    INITIAL = 2.0**16
    GROWTH_INTERVAL = 2000

    def __init__(self, device: torch.device) -> None:
        self.scale = torch.full((), self.INITIAL, device=device)
        self.good_steps = torch.zeros((), device=device)

    def update(self, overflow: torch.Tensor) -> None:
        counted = self.good_steps + 1
        grow = (counted >= self.GROWTH_INTERVAL) & ~overflow
        factor = torch.where(overflow, 0.5, torch.where(grow, 2.0, 1.0))
        self.scale.mul_(factor)
        self.good_steps.copy_(torch.where(overflow | grow, 0.0, counted))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.good_steps.copy_(state["good_steps"])


class StepOutcome(NamedTuple):
    """What an optimizer step did, as device tensors (reading them would wait for it)."""

    skipped: torch.Tensor  # bool: the loss or the gradient was not finite; nothing changed
    # bool: counts towards a divergence: a skipped step, except that with loss scaling a
    # gradient overflow is the scale's business and only a non-finite loss counts.
    diverging: torch.Tensor


class OptimizerStep:
    """Clip, guard and update: what follows the backward pass, for any optimizers.

    `scale_loss` gives the loss to call backward() on (multiplied by the loss scale when
    there is one); `__call__` then clips the gradients to `grad_clip` in total norm, skips
    the update of every optimizer when the loss or the gradient is not finite, updates and
    clears the gradients.
    """

    def __init__(
        self,
        parameters: list[nn.Parameter],
        optimizers: dict[str, torch.optim.Optimizer],
        grad_clip: float,
        loss_scale: LossScale | None = None,
    ) -> None:
        self.parameters, self.optimizers = parameters, optimizers
        self.grad_clip, self.loss_scale = grad_clip, loss_scale

    def set_lr(self, factor: float) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.loss_scale is None else loss * self.loss_scale.scale

    def __call__(self, loss: torch.Tensor) -> StepOutcome:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        # Averaged (DDP) or sharded (FSDP) gradients give every process the same norm, so
        # they all clip alike and skip a step together.
        norm = replicated_value(nn.utils.get_total_norm(grads))
        loss_finite = torch.isfinite(loss)
        skipped = ~(loss_finite & torch.isfinite(norm))
        # The gradients are `scale` times the true ones; dividing them by this unscales
        # them and clips their true norm to grad_clip.
        scale = 1.0 if self.loss_scale is None else self.loss_scale.scale
        divisor = torch.clamp(norm / self.grad_clip, min=scale)
        skip_on_host: bool | None = None
        for optimizer in self.optimizers.values():
            if skips_on_device(optimizer):
                optimizer.grad_scale = divisor
                optimizer.found_inf = skipped.float()
                optimizer.step()
                continue
            own = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            torch._foreach_div_(own, divisor)
            if skip_on_host is None:
                skip_on_host = bool(skipped)
            if not skip_on_host:
                optimizer.step()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        if self.loss_scale is None:
            return StepOutcome(skipped, skipped)
        self.loss_scale.update(skipped)
        return StepOutcome(skipped, ~loss_finite)

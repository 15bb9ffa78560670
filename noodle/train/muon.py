"""Muon with the matrices of one shape orthogonalised together.

`torch.optim.Muon` runs Newton-Schulz on one matrix after another, about twenty small
kernels each, and has no way to skip a step but the host reading the guard first: on a
small model its step costs more than the forward and backward passes. `BatchedMuon` does
the same arithmetic (its hyperparameters, its momentum buffers, its bfloat16 Newton-Schulz)
on stacks of matrices: a tall matrix is transposed, as Newton-Schulz treats it anyway, so
a block's up and down projections share one stack. And it follows fused AdamW's protocol
for the step: gradients are divided by `grad_scale`, and where `found_inf` is set the step
changes nothing, decided on the device. Its state is `torch.optim.Muon`'s, so either
resumes the other's runs.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch
from torch import Tensor

Bucket = tuple[int, int, torch.dtype, torch.device]


@functools.cache
def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16, as `torch.optim.Muon` uses; float32 on a GPU without bfloat16 products
    (before Ampere), where cuBLAS refuses or emulates them."""
    if device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def orthogonalise(
    stack: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    """The Newton-Schulz iteration of `torch.optim.Muon` on a stack of wide matrices
    (rows <= columns) at once, in `newton_schulz_dtype`."""
    a, b, c = coefficients
    x = stack.to(newton_schulz_dtype(stack.device))
    norms = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / norms.clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x


def wide(matrix: Tensor) -> Tensor:
    return matrix.mT if matrix.size(0) > matrix.size(1) else matrix


def shaped_as(param: Tensor, wide_matrix: Tensor) -> Tensor:
    """`wide_matrix` (made by `wide`) in the orientation of `param`."""
    return wide_matrix.mT if param.size(0) > param.size(1) else wide_matrix


class BatchedMuon(torch.optim.Muon):
    """`torch.optim.Muon`, batched by shape, with fused AdamW's `grad_scale` and `found_inf`
    (set them as attributes before `step`, as `torch.amp.GradScaler` does)."""

    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("BatchedMuon.step takes no closure")
        # 1 where the step goes ahead, 0 where it is skipped: multiplying by it leaves a
        # skipped step's buffers and weights bit-identical (finite values plus zero).
        keep = None if self.found_inf is None else 1 - self.found_inf
        for group in self.param_groups:
            buckets: dict[Bucket, list[Tensor]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                rows, columns = param.shape
                key = (min(rows, columns), max(rows, columns), param.dtype, param.device)
                buckets[key].append(param)
            for params in buckets.values():
                self.update(group, params, keep)

    def update(self, group: dict, params: list[Tensor], keep: Tensor | None) -> None:
        """One step of the matrices `params`, all of one shape once made wide."""
        momentum, lr = group["momentum"], group["lr"]
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        grads = torch.stack([wide(p.grad) for p in params])
        if self.grad_scale is not None:
            grads.div_(self.grad_scale)
        stacked_buffers = torch.stack([wide(b) for b in buffers])
        if keep is None:
            stacked_buffers.lerp_(grads, 1 - momentum)
        else:
            grads = torch.where(keep > 0, grads, 0.0)
            stacked_buffers.lerp_(grads, (1 - momentum) * keep)
        torch._foreach_copy_(
            buffers,
            [shaped_as(p, b) for p, b in zip(params, stacked_buffers.unbind(), strict=True)],
        )
        direction = grads.lerp(stacked_buffers, momentum) if group["nesterov"] else stacked_buffers
        update = orthogonalise(
            direction, group["ns_coefficients"], group["ns_steps"], group["eps"]
        ).to(params[0].dtype)
        decay = 1 - lr * group["weight_decay"]
        if keep is None:
            torch._foreach_mul_(params, decay)
        else:
            torch._foreach_mul_(params, 1 - (1 - decay) * keep)
            update.mul_(keep)
        updates = [shaped_as(p, u) for p, u in zip(params, update.unbind(), strict=True)]
        scales = [-lr * update_scale(group["adjust_lr_fn"], p.shape) for p in params]
        torch._foreach_mul_(updates, scales)
        torch._foreach_add_(params, updates)


def update_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """`torch.optim.Muon`'s learning-rate factor for a matrix of `shape`."""
    rows, columns = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1, rows / columns))

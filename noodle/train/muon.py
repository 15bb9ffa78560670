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
from collections.abc import Callable
from typing import NamedTuple

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


class Stack(NamedTuple):
    """The matrices of one parameter group that share a shape once made wide."""

    group: dict
    params: list[Tensor]

    def gradients(self, out: Tensor | None = None) -> Tensor:
        """The matrices' gradients made wide and stacked (into `out`, where given)."""
        return torch.stack([wide(p.grad) for p in self.params], out=out)


class CudaGraph:
    """`record` captured once as a CUDA graph; `replay` runs its kernels again with one
    launch."""

    def __init__(self, record: Callable[[], None]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        # Thread-local: the run's writer thread may copy tensors meanwhile.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            record()

    def replay(self) -> None:
        self.graph.replay()


class BatchedMuon(torch.optim.Muon):
    """`torch.optim.Muon`, batched by shape, with fused AdamW's `grad_scale` and `found_inf`
    (set them as attributes before `step`, as `torch.amp.GradScaler` does).

    On a CUDA GPU (unless `graphed` is false) its update is recorded as a CUDA graph at its
    second step and replayed from then on: issued from Python, its hundred-odd kernels
    took the host longer than the GPU's whole training step on some machines
    (benchmarks/RESULTS.md). The first step (and the first after loading a state) is
    issued op by op: it creates the momentum buffers the graph reads and warms up the
    libraries its kernels come from. The recording reads each step's learning rates,
    `grad_scale` and `found_inf`; the groups' other settings (momentum, weight decay,
    Newton-Schulz's) are those it was recorded with.
    """

    # What records the update, and on which devices (the tests record on the CPU).
    recorder: Callable[[Callable[[], None]], CudaGraph] = CudaGraph

    @staticmethod
    def records_on(device: torch.device) -> bool:
        return device.type == "cuda"

    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    def __init__(self, params, *, graphed: bool = True, **options) -> None:
        super().__init__(params, **options)
        self.graphed = graphed
        self.recorded: RecordedUpdate | None = None
        self.stepped_op_by_op = False

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The recorded update reads the momentum buffers this replaced.
        self.recorded, self.stepped_op_by_op = None, False

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("BatchedMuon.step takes no closure")
        stacks = self.stacks()
        if not stacks:
            return
        if self.graphed and self.stepped_op_by_op and self.records_on(stacks[0].params[0].device):
            matrices = [id(p) for stack in stacks for p in stack.params]
            if self.recorded is None or self.recorded.matrices != matrices:
                self.recorded = RecordedUpdate(self, stacks, matrices, self.recorder)
            self.recorded.run()
            return
        keep = None if self.found_inf is None else 1 - self.found_inf
        for stack in stacks:
            self.update(stack, stack.gradients(), stack.group["lr"], self.grad_scale, keep)
        self.stepped_op_by_op = True

    def stacks(self) -> list[Stack]:
        """The matrices that have a gradient, stacked by group and wide shape (their
        momentum buffers created where missing)."""
        stacks = []
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
            stacks.extend(Stack(group, params) for params in buckets.values())
        return stacks

    def update(
        self,
        stack: Stack,
        grads: Tensor,
        lr: float | Tensor,
        grad_scale: Tensor | None,
        keep: Tensor | None,
    ) -> None:
        """One step of the matrices of `stack`, whose gradients `grads` holds stacked wide
        (and may overwrite). `keep` is 1 where the step goes ahead, 0 where it is skipped:
        multiplying by it leaves a skipped step's buffers and weights bit-identical (finite
        values plus zero)."""
        group, params = stack
        momentum = group["momentum"]
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        if grad_scale is not None:
            grads.div_(grad_scale)
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
            update.mul_(-lr)
        else:
            torch._foreach_mul_(params, 1 - (1 - decay) * keep)
            update.mul_(-lr * keep)
        updates = [shaped_as(p, u) for p, u in zip(params, update.unbind(), strict=True)]
        torch._foreach_mul_(updates, [update_scale(group["adjust_lr_fn"], p.shape) for p in params])
        torch._foreach_add_(params, updates)


class RecordedUpdate:
    """A BatchedMuon update of fixed matrices, recorded by `recorder` (`CudaGraph`) from
    tensors of its own: each step copies the stacked gradients, the learning rates, the
    clipping's divisor and the skip flag into them, then replays it."""

    def __init__(
        self,
        optimizer: BatchedMuon,
        stacks: list[Stack],
        matrices: list[int],
        recorder: Callable[[Callable[[], None]], CudaGraph],
    ) -> None:
        self.matrices = matrices  # the ids of the parameters it updates, in order
        self.optimizer = optimizer
        device = stacks[0].params[0].device
        # A group added later holds no matrix recorded here.
        self.groups = groups = list(optimizer.param_groups)
        self.lrs = torch.zeros(len(groups), device=device)
        self.grad_scale = torch.ones((), device=device)
        self.found_inf = torch.zeros((), device=device)
        self.grads = [torch.empty_like(stack.gradients()) for stack in stacks]
        group_index = {id(group): index for index, group in enumerate(groups)}
        self.lr_of_stack = [self.lrs[group_index[id(s.group)]] for s in stacks]

        def record() -> None:
            keep = 1 - self.found_inf
            for stack, grads, lr in zip(stacks, self.grads, self.lr_of_stack, strict=True):
                optimizer.update(stack, grads, lr, self.grad_scale, keep)

        self.stacks = stacks
        self.recording = recorder(record)

    def run(self) -> None:
        optimizer = self.optimizer
        for stack, grads in zip(self.stacks, self.grads, strict=True):
            stack.gradients(out=grads)
        for lr, group in zip(self.lrs, self.groups, strict=True):
            lr.fill_(group["lr"])
        if optimizer.grad_scale is None:
            self.grad_scale.fill_(1.0)
        else:
            self.grad_scale.copy_(optimizer.grad_scale)
        if optimizer.found_inf is None:
            self.found_inf.zero_()
        else:
            self.found_inf.copy_(optimizer.found_inf)
        self.recording.replay()


def update_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """`torch.optim.Muon`'s learning-rate factor for a matrix of `shape`."""
    rows, columns = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1, rows / columns))

"""The training loss: next-token cross-entropy of the output layer's logits.

`output_cross_entropy` is what the model's forward pass returns with targets. Its plain
form makes the logits of every position, (tokens x vocabulary), and F.cross_entropy then
keeps them for the backward pass, which writes their gradient, as large again, and reads
that gradient once more for the bias's. The fused form (`FusedOutputCrossEntropy`, chosen
with `chunk` > 0) computes the loss and the gradients of the output layer's input, weight
and bias in the forward pass, `chunk` positions at a time: nothing of the vocabulary's
width is kept for the backward pass, the float32 copy of the logits never exists, and the
bias's gradient comes out of the weight's matrix product. Run eagerly, each chunk's logits
live only while its loss and logit gradient are made; compiled, the scheduler may keep
several chunks' logits at once (inductor on CPU makes every chunk's logit gradient in one
kernel after the last chunk's log-softmax). The same arithmetic in the same precision:
logits in the compute dtype, log-softmax in float32, matrix products of the logit
gradient in the compute dtype (see tests/test_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # a target the loss skips (prompt and padding positions)
# Positions per chunk of the fused form when training compiled: each chunk rereads the
# output layer's weight, so chunks of thousands of positions keep that small beside the
# chunk's logits (4,096 x 50,304 in bfloat16: 412 MB), a quarter of GPT-2's batch of 16.
FUSED_CHUNK = 4096

# The column of ones appended to the output layer's input (see `FusedOutputCrossEntropy`)
# is padded so that rows stay 16-byte aligned for the tensor cores.
BIAS_COLUMNS = 8


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a Linear layer multiplies in here: autocast's, else its weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class FusedOutputCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets` (IGNORE skipped),
    with every gradient computed in the forward pass and only scaled in the backward.

    Per chunk: logits = bias + hidden_c @ weight.T (compute dtype), their float32
    log-softmax and the unnormalised logit gradient softmax - one_hot(target), rounded to
    the compute dtype. After the last chunk, two matrix products over all positions give
    the input's gradient (dlogits @ weight) and, with a column of ones appended to the
    input, the weight's and the bias's together (dlogits.T @ [hidden | 1]): the bias's
    gradient, a sum over positions, costs no separate pass over the logit gradient.
    Dividing by the number of predicted positions happens after the products, in float32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        positions, width = hidden.shape
        vocab = weight.shape[0]
        inputs, matrix, offsets = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
        predicted = targets != IGNORE
        count = predicted.sum().float()  # none predicted: NaN, as F.cross_entropy gives
        columns = torch.arange(vocab, device=hidden.device)
        losses, logit_grads = [], []
        for start in range(0, positions, chunk):
            rows = slice(start, min(start + chunk, positions))
            logits = torch.addmm(offsets, inputs[rows], matrix.t())
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            target, keep = targets[rows], predicted[rows]
            target_log_prob = log_probs.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
            losses.append(torch.where(keep, target_log_prob, 0.0).sum().neg())
            is_target = columns == target[:, None]
            logit_grad = torch.where(keep[:, None], log_probs.exp() - is_target.float(), 0.0)
            logit_grads.append(logit_grad.to(dtype))
        loss = torch.stack(losses).sum() / count
        logit_grad = torch.cat(logit_grads)
        grad_hidden = (logit_grad @ matrix).float().div_(count).to(hidden.dtype)
        ones = torch.zeros(positions, BIAS_COLUMNS, dtype=dtype, device=hidden.device)
        ones[:, 0] = 1
        grad_weight_bias = (logit_grad.t() @ torch.cat([inputs, ones], dim=1)).float() / count
        grad_weight = grad_weight_bias[:, :width].to(weight.dtype)
        grad_bias = grad_weight_bias[:, width].to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grads = (grad_hidden * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss)
        return (*grads, None, None, None)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` (..., vocab) against `targets` (...), in float32,
    skipping IGNORE targets."""
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )


def output_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = 0
) -> torch.Tensor:
    """Mean next-token cross-entropy of the output layer `head` applied to `hidden`
    (..., width) against `targets` (...), skipping IGNORE targets.

    `chunk` > 0 takes the fused form, `chunk` positions at a time, when gradients are being
    recorded and the compute dtype is float32 or bfloat16. float16 keeps the plain form:
    its loss scale must multiply the logit gradient before that is rounded, and the fused
    form rounds it in the forward pass, before the scale is applied.
    """
    if chunk > 0 and torch.is_grad_enabled():
        dtype = compute_dtype(head.weight)
        if dtype != torch.float16:
            return FusedOutputCrossEntropy.apply(
                hidden.reshape(-1, hidden.shape[-1]),
                head.weight,
                head.bias,
                targets.reshape(-1),
                chunk,
                dtype,
            )
    return cross_entropy(head(hidden), targets)

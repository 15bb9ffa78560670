"""Inference precision: the dtype a model generates in, and casting (or packing) its
weights once for it."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from noodle.device import select_dtype
from noodle.model import NoodleModel

# FBGEMM's float16 functions are deprecated in favour of torchao (not a dependency), yet in
# PyTorch 2.13 they are the fastest float16 path on x86: 2x float32 on somen's output layer.
# Process-wide on purpose: the warning would otherwise reach every chat user once.
warnings.filterwarnings("ignore", r"fbgemm_\w+ is deprecated", UserWarning)


def packed_float16_available() -> bool:
    """Whether this PyTorch build has FBGEMM's float16-weight matrix products (x86 CPUs)."""
    return hasattr(torch, "fbgemm_pack_gemm_matrix_fp16") and (
        "fbgemm" in torch.backends.quantized.supported_engines
    )


def uses_packed_float16(dtype: torch.dtype, device: torch.device, compiled: bool) -> bool:
    """Whether float16 on this device means `Float16Linear`: on a CPU with FBGEMM, when the
    decode step is not compiled (the compiler cannot trace FBGEMM's packed weights)."""
    return (
        dtype == torch.float16
        and device.type == "cpu"
        and not compiled
        and packed_float16_available()
    )


def select_inference_dtype(dtype: str, device: torch.device, compiled: bool) -> torch.dtype:
    """`--dtype` for generating: as for training (`select_dtype`), except that auto is
    float16 where that means `Float16Linear` (float16 weights, float32 arithmetic): decoding
    reads every weight once per token, so half the bytes is most of the speed, and the
    greedy tokens agree with float32 (benchmarks/RESULTS.md)."""
    if dtype == "auto" and uses_packed_float16(torch.float16, device, compiled):
        return torch.float16
    return select_dtype(dtype, device)


class Float16Linear(nn.Module):
    """An nn.Linear for CPU inference whose weight is stored in float16 and packed for
    FBGEMM, which converts it on the fly and multiplies in float32.

    Inference only: the packed weight is an opaque CPU tensor, neither a parameter nor in
    the state dict, and the compiler cannot trace it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.packed_weight = torch.fbgemm_pack_gemm_matrix_fp16(linear.weight.detach().float())
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.fbgemm_linear_fp16_weight_fp32_activation(rows, self.packed_weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def replace_linears(module: nn.Module, replacement: type[nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, replacement(child))
        else:
            replace_linears(child, replacement)


def prepare_for_inference(
    model: NoodleModel, dtype: torch.dtype, compiled: bool = False
) -> NoodleModel:
    """Cast the weights once to the inference precision (no per-operation autocast).

    On CPU, float16 is float16 weights with float32 arithmetic where FBGEMM can do it
    (`uses_packed_float16`): CPUs without native half-precision arithmetic run float16
    matrix products on slow converting kernels. float32 on CPU stores every Linear weight
    input-major (the transpose of nn.Linear's layout), for which MKL's matrix-vector
    product is faster: 1.4 ms against 4.4 ms for somen's 256 x 50,304 output layer on the
    benchmark machine (benchmarks/RESULTS.md); the shapes stay the same, only the strides
    change.
    """
    device = model.tok_emb.weight.device
    if uses_packed_float16(dtype, device, compiled):
        replace_linears(model, Float16Linear)
        return model
    # The rotary tables stay float32, as in the autocast training the model learnt with;
    # rounding them to bfloat16 as well made greedy decoding part from float32 a little
    # sooner (9 rather than 10 of 16 prompts agreeing for 50 tokens, RESULTS.md).
    rotary_tables = model.rope_cos, model.rope_sin
    model.to(dtype=dtype)
    model.rope_cos, model.rope_sin = rotary_tables
    if dtype == torch.float32 and device.type == "cpu":
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()
    return model

"""Choosing the compute device and the precision to run on it."""

from __future__ import annotations

import contextlib
import os

import torch

from noodle.errors import NoodleError, UsageError, did_you_mean
from noodle.memory import keep_freed_memory

BACKENDS = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(backend: str | None, local_rank: int = 0) -> torch.device:
    """`--backend`, else $NOODLE_BACKEND, else auto (cuda, then mps, then cpu); on CUDA the
    GPU `local_rank` (a process's own GPU when torchrun starts one per GPU)."""
    name = (backend or os.environ.get("NOODLE_BACKEND") or "auto").lower()
    if name not in BACKENDS:
        raise UsageError(
            f"unknown backend {name!r}{did_you_mean(name, BACKENDS)} (choose {', '.join(BACKENDS)})"
        )
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise NoodleError("backend cuda requested but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise NoodleError("backend mps requested but MPS is not available")
    if name == "cpu":
        keep_freed_memory()
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        # float32 matmuls (outside autocast) on tensor cores; bf16 paths are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device(name)


def select_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`--dtype`: auto is bfloat16 on GPUs that support it and float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UsageError(
            f"unknown dtype {dtype!r}{did_you_mean(dtype, DTYPES)} (choose auto, "
            f"{', '.join(DTYPES)})"
        )
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; weights and optimizer stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory(device: torch.device) -> dict[str, float]:
    """{"peak_memory_gb": the most memory tensors held on `device` so far} on CUDA (each
    process its own GPU's), else nothing."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)}

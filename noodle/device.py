"""Choosing the compute device and the precision to run on it."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys

import torch

from noodle.errors import NoodleError, UsageError

BACKENDS = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(backend: str | None) -> torch.device:
    """`--backend`, else $NOODLE_BACKEND, else auto (cuda, then mps, then cpu)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        # Without DistributedDataParallel every process would train the same model alone
        # and all of them would write the same files: refuse rather than corrupt.
        raise NoodleError(
            f"{world_size} processes (torchrun) are not supported yet: run one process per "
            "machine; distributed training is planned"
        )
    name = (backend or os.environ.get("NOODLE_BACKEND") or "auto").lower()
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r} (choose {', '.join(BACKENDS)})")
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
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        # float32 matmuls (outside autocast) on tensor cores; bf16 paths are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device(name)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (Linux), whose malloc holds PyTorch's CPU tensors."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the OS after every step.

    PyTorch's CPU allocator does not cache: each step's activations (the logits alone are
    batch × ctx × 50,304 floats) are fresh mmap'd pages, zeroed by the kernel on first touch.
    Serving them from the heap instead halves a small model's step time on CPU (measured:
    sys time 18.7 s -> 1.1 s over 60 steps).
    """
    libc = glibc()
    if libc is None:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)


def release_free_memory() -> None:
    """Give every whole free page of glibc's heap back to the OS (malloc_trim).

    For the end of a phase whose freed blocks the next one cannot reuse: PyTorch allocates
    CPU tensors 64-byte aligned, and glibc before 2.38 cannot serve such a request from a
    freed block of the same size, so, with `keep_freed_memory`, the next phase's tensors
    would take new memory beside the kept blocks. The pages come back, zeroed, when needed.
    """
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def select_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`--dtype`: auto is bfloat16 on GPUs that support it and float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
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

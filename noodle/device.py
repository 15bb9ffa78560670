"""Choosing the compute device and the precision to run on it."""

from __future__ import annotations

import contextlib
import os

import torch

from noodle.cores import available_cores
from noodle.errors import NoodleError, UsageError, did_you_mean
from noodle.memory import keep_freed_memory

BACKENDS = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_type(backend: str | None) -> str:
    """The type of device (cuda, mps or cpu) `--backend` names, else $NOODLE_BACKEND, else
    auto (cuda, then mps, then cpu); refused if it is not there."""
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
    return name


def select_device(backend: str | None, local_rank: int = 0) -> torch.device:
    """The device of `device_type(backend)`, set up; on CUDA the GPU `local_rank` (a
    process's own GPU when torchrun starts one per GPU)."""
    name = device_type(backend)
    if name == "cpu":
        keep_freed_memory()
        use_free_cores()
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        # float32 matmuls (outside autocast) on tensor cores; bf16 paths are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device(name)


def free_core_threads(load: float, cpus: int, default: int) -> int:
    """Intra-op threads for `cpus` logical CPUs whose 1-minute load average is `load`: one
    per CPU that other work leaves free, at most PyTorch's `default`, at least one."""
    return max(1, min(default, round(cpus - load)))


def use_free_cores() -> None:
    """Give PyTorch only the cores other work leaves free (unless OMP_NUM_THREADS decides).

    PyTorch's default, a thread per core, splits every operation over all of them and waits
    for the slowest part: a thread whose core is busy with another process stalls them all.
    On the 2-core development machine with other work running, one thread decoded 4-6x and
    trained 1.6-5x faster than two (benchmarks/RESULTS.md); on a quiet machine the load is
    low and every core is used. A container's CPU quota caps the cores (see
    `cores.available_cores`). The load average is read once, at start."""
    if os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):
        return
    cpus = available_cores()
    torch.set_num_threads(free_core_threads(os.getloadavg()[0], cpus, torch.get_num_threads()))


def describe_device(device: torch.device) -> str:
    """`cuda:0`, or on the CPU with its thread count: `cpu (1 thread)`."""
    if device.type != "cpu":
        return str(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


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


class HostCopy:
    """A tensor on its way to host memory: on a GPU the copy completes once the work queued
    before it does, and until then the host goes on queueing more."""

    def __init__(self, values: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if values.is_cuda:
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def tolist(self) -> list:
        """The values; waits for the copy if it is not done."""
        if self.event is not None:
            self.event.synchronize()
        return self.values.tolist()


def peak_memory(device: torch.device) -> dict[str, float]:
    """{"peak_memory_gb": the most memory tensors held on `device` so far} on CUDA (each
    process its own GPU's), else nothing."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)}

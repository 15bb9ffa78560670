"""glibc's memory tuning for PyTorch's CPU tensors: keeping freed blocks for the next step,
and handing whole free pages back at the end of a phase."""

from __future__ import annotations

import ctypes
import functools
import sys


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

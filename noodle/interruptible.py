"""Waits that Ctrl-C and SIGTERM can interrupt.

The kernel hands a signal sent to the process to any of its threads that does not block it,
and torch starts threads of its own. Python runs its handler in the main thread only, once
that thread runs again: a main thread asleep in a read of an idle pipe, or waiting for a
queue, would sleep on while the signal waited for it. These waits wake every `WAKE_S`
to let a pending handler run.
"""

from __future__ import annotations

import os
import queue
import select
import stat
from pathlib import Path
from typing import TypeVar

WAKE_S = 0.1
Item = TypeVar("Item")


def wait_readable(fd: int) -> None:
    """Return once `fd` has data or has reached its end."""
    while not select.select([fd], [], [], WAKE_S)[0]:
        pass


def read_all(path: Path) -> bytes:
    """The bytes of `path`. A pipe (a named pipe, a process substitution) is opened without
    waiting for its writer and read as it comes, each wait interruptible."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)
            with open(fd, "rb", closefd=False) as stream:
                return stream.read()
        chunks = []
        while True:
            wait_readable(fd)
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:  # woken with nothing to read after all
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def next_item(source: queue.Queue[Item]) -> Item:
    """The next item of `source`, waiting for it as long as it takes."""
    while True:
        try:
            return source.get(timeout=WAKE_S)
        except queue.Empty:
            continue

"""Waits that Ctrl-C and SIGTERM can interrupt.

The kernel hands a signal sent to the process to any of its threads that does not block it,
and torch starts threads of its own. Python runs its handler in the main thread only, once
that thread runs again: a main thread asleep in a read of an idle pipe, or waiting for a
queue, would sleep on while the signal waited for it. So the main thread waits here, waking
every `WAKE_S` to let a pending handler run.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import TypeVar

WAKE_S = 0.1
Item = TypeVar("Item")


def next_item(source: queue.Queue[Item]) -> Item:
    """The next item of `source`, waiting for it as long as it takes."""
    while True:
        try:
            return source.get(timeout=WAKE_S)
        except queue.Empty:
            continue


def read_all(path: Path) -> bytes:
    """The bytes of `path`, read by a helper thread while this one waits: a named pipe or a
    process substitution may keep the reader waiting for its writer."""
    outcome: queue.Queue[tuple[bool, bytes | BaseException]] = queue.Queue(maxsize=1)

    def read() -> None:
        try:
            outcome.put((True, path.read_bytes()))
        except BaseException as exc:  # raised in the waiting thread
            outcome.put((False, exc))

    threading.Thread(target=read, daemon=True, name="noodle-read").start()
    ok, value = next_item(outcome)
    if not ok:
        raise value
    return value

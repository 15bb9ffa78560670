"""One run at a time in an output directory: an exclusive advisory lock (flock) on a file
inside it, held for the whole run and released by the kernel when the process ends, however
it ends (a kill -9 included), so no stale lock is ever left to clear by hand."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from noodle.errors import NoodleError

LOCK_FILE = ".noodle.lock"


class RunLock:
    """Holds `directory`'s lock from construction to `release()` (or the end of a `with`);
    refused with the holder's process id while another process holds it."""

    def __init__(self, directory: Path) -> None:
        path = directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise NoodleError(f"cannot lock {directory}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise NoodleError(
                f"{directory} is in use: another noodle run ({who}) is writing it; wait for "
                "it to end or choose another output directory"
            ) from None
        # Who holds it, for the message above: written once the lock is ours.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no stale process id for the next run's refusals
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _holder(fd: int, patience_s: float = 2.0) -> str:
    """The process id the lock's holder wrote, or "" if none came. A holder writes it just
    after taking the lock, so a run refused in that instant waits for it a moment."""
    deadline = time.monotonic() + patience_s
    while True:
        holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        if holder or time.monotonic() > deadline:
            return holder
        time.sleep(0.01)

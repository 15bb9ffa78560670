"""Saving off the training thread.

A save has two parts: copying the tensors to host memory (a snapshot: quick, and it must
happen between two steps, on the training thread) and writing the file with fsync (slow:
somen's resume state is 350 MB). The writer does the second part on one background thread,
in the order the jobs were submitted, while training goes on. At most one job waits
behind the one being written, so memory stays bounded: a third blocks the training thread.

On the CPU the tensors already are in host memory; copying them would only cost memory, so
there the writer runs each job at once on the training thread (`background=False`).

In a run of several processes only the first writes: the others' writers drop their jobs
(`writes=False`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

import torch


class Writer:
    def __init__(self, background: bool, writes: bool = True) -> None:
        self.background, self.writes = background, writes
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def snapshot(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Contiguous host tensors holding the values that the (name, tensor) pairs have
        now, taken one pair at a time. In the background they are copies, which the
        training thread is free to change afterwards."""
        return {
            name: tensor.detach().to("cpu", copy=self.background).contiguous()
            for name, tensor in tensors
        }

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` after the jobs before it; raises the failure of an earlier one."""
        self.raise_failure()
        if not self.writes:
            return
        if not self.background:
            job()
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="noodle-writer", daemon=True)
            self.thread.start()
        self.jobs.put(job)

    def wait(self) -> None:
        """Return once every submitted job is done; raises the failure of any of them."""
        if self.thread is not None:
            self.jobs.join()
        self.raise_failure()

    def close(self) -> None:
        """Wait for the jobs and stop the thread (a later `submit` starts another)."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
        self.raise_failure()

    def raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.failure is None:  # after a failure, later saves would mislead
                    job()
            except BaseException as exc:
                self.failure = exc
            finally:
                self.jobs.task_done()
        self.jobs.task_done()

"""Peak resident memory of a process and all its descendants together, sampled (Linux).

`/usr/bin/time -v` and `getrusage` report the largest single process of a tree, which says
little once a command works in several processes; this sums them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def process_tree(root: int) -> list[int]:
    """`root` and its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        parent = int(stat.rpartition(")")[2].split()[1])  # the name in (...) may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def resident_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError):
        return 0


class TreePeakMemory:
    """Samples the summed RSS of `root`'s process tree every `interval_s` until stopped.

    A peak shorter than the interval can be missed; shared library pages count once per
    process, as in each process's own RSS.
    """

    def __init__(self, root: int, interval_s: float = 0.1) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak_bytes = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stopped.is_set():
            total = sum(map(resident_bytes, process_tree(self.root)))
            self.peak_bytes = max(self.peak_bytes, total)
            self.stopped.wait(self.interval_s)

    def stop(self) -> float:
        """Stop sampling; the peak in MiB."""
        self.stopped.set()
        self.thread.join()
        return self.peak_bytes / 2**20

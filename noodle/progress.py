"""Progress and log output on stderr: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as ProgressTask
from rich.text import Text

PLAIN_INTERVAL_S = 5.0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class CountColumn(ProgressColumn):
    """`done/total` for counted work; byte counts are left to the task's info (MB, MB/s)."""

    def render(self, task: ProgressTask) -> Text:
        if task.fields.get("unit") == "bytes":
            return Text("")
        total = f"/{task.total:,.0f}" if task.total is not None else ""
        return Text(f"{task.completed:,.0f}{total}")


class Task:
    """One long piece of work with a known (or unknown) total."""

    def __init__(self, reporter: Reporter, description: str, total: float | None, unit: str):
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.done = 0.0
        self.started = self.last_line = time.monotonic()
        self.id = None
        if reporter.progress is not None:
            self.id = reporter.progress.add_task(description, total=total, info="", unit=unit)

    def _info(self, fields: dict) -> str:
        parts = []
        if self.unit == "bytes":
            elapsed = max(time.monotonic() - self.started, 1e-9)
            total = f"/{self.total / 1e6:,.1f}" if self.total else ""
            rate = self.done / 1e6 / elapsed
            parts.append(f"{self.done / 1e6:,.1f}{total} MB ({rate:,.1f} MB/s)")
        parts += [f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in fields.items()]
        return " | ".join(parts)

    def advance(self, amount: float, **fields) -> None:
        self.done += amount
        self.update(**fields)

    def update(self, completed: float | None = None, force: bool = False, **fields) -> None:
        if completed is not None:
            self.done = completed
        info = self._info(fields)
        if self.id is not None:
            self.reporter.progress.update(self.id, completed=self.done, info=info)
            return
        now = time.monotonic()
        if force or now - self.last_line >= PLAIN_INTERVAL_S:
            self.last_line = now
            total = f"/{self.total:,.0f}" if self.total and self.unit != "bytes" else ""
            count = f" {self.done:,.0f}{total}" if self.unit != "bytes" else ""
            self.reporter.info(f"{self.description}{count} | {info}")

    def finish(self, **fields) -> None:
        if fields or self.id is not None:
            self.update(force=True, **fields)
        if self.id is not None:
            self.reporter.progress.remove_task(self.id)
            elapsed = format_duration(time.monotonic() - self.started)
            self.reporter.info(f"{self.description} done in {elapsed} | {self._info(fields)}")


class Reporter:
    """Everything Noodle says about a run goes through here, to stderr."""

    def __init__(
        self, interactive: bool | None = None, quiet: bool = False, silent: bool = False
    ) -> None:
        """`quiet`: warnings only; `silent`: nothing at all (the processes of a torchrun run
        other than the first, which reports for them)."""
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet, self.silent = quiet or silent, silent
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.progress: Progress | None = None
        if interactive and not quiet:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                CountColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=True,
            )
            self.progress.start()

    def start_task(self, description: str, total: float | None, unit: str = "steps") -> Task:
        return Task(self, description, total, unit)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        if not self.silent:
            self.console.print(f"warning: {message}", markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

"""Progress and log output on stderr: a rich progress bar on a terminal, plain lines otherwise.

Each stage of a command (tokenizing, training, evaluating) is a Task. On a terminal its bar
shows the work done, the time elapsed and left, and the latest figures (loss, tokens/s, ...)
in one line that fits the terminal; elsewhere (CI, pipes, Modal) a line with the same facts
is written at most every PLAIN_INTERVAL_S seconds. Either way the stage ends with one
summary line: what was done and how long it took, or where it was interrupted.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.progress import Task as ProgressTask
from rich.table import Column
from rich.text import Text

PLAIN_INTERVAL_S = 5.0
BAR_WIDTH = 16


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_bytes(count: float) -> str:
    """`512 B`, `40.1 kB`, `4.2 MB`, `2.2 GB`."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,.0f} B"


def plural(count: int, noun: str) -> str:
    """`1 step`, `2 steps`, `1,000 steps`."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def timing_text(task: Task) -> str:
    """`elapsed<left`, as tqdm shows it."""
    left = task.seconds_left()
    return f"{format_duration(task.elapsed())}<{'?' if left is None else format_duration(left)}"


class StatusColumn(ProgressColumn):
    """Everything right of the bar, cut to the console's width: the count, the time elapsed
    and left, then the latest figures, which give way first; a note (a Ctrl-C
    acknowledgement) takes the place of the time and the figures."""

    def __init__(self, console: Console) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.console = console

    def render(self, task: ProgressTask) -> Text:
        stage: Task = task.fields["task"]
        if stage.note:
            head, tail = stage.count_text(), stage.note
        else:
            head, tail = f"{stage.count_text()} {timing_text(stage)}", stage.info_text()
        room = self.console.width - len(stage.description) - BAR_WIDTH - len(head) - 4
        if len(tail) > room:
            tail = tail[: max(room - 1, 0)] + "…" if room > 1 else ""
        return Text(f"{head} {tail}".rstrip())


class Task:
    """One stage of work with a known (or unknown) total, counted in `unit`s ("steps",
    "batches" or "bytes")."""

    def __init__(
        self,
        reporter: Reporter,
        description: str,
        total: float | None,
        unit: str,
        completed: float = 0.0,
    ) -> None:
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        # The rate counts this run's work only: a resumed run starts at its saved step.
        self.done = self.done_at_start = completed
        self.fields: dict[str, object] = {}
        self.note = ""
        self.started = self.last_line = time.monotonic()
        self.id = None
        if reporter.progress is not None:
            self.id = reporter.progress.add_task(
                description, total=total, completed=completed, task=self
            )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def seconds_left(self) -> float | None:
        """The time the rest takes at the rate so far; None while there is no rate yet."""
        if not self.total:
            return None
        done = self.done - self.done_at_start
        if done <= 0:
            return None
        return (self.total - self.done) * self.elapsed() / done

    def count_text(self, with_total: bool = True) -> str:
        """`120/920 steps`, or for bytes `1.2/4.2 MB (1.1 MB/s)`."""
        total = self.total if with_total else None
        if self.unit == "bytes":
            rate = format_bytes(self.done / max(self.elapsed(), 1e-9))
            of = f"/{format_bytes(total)}" if total else ""
            return f"{format_bytes(self.done)}{of} ({rate}/s)"
        of = f"/{total:,.0f}" if total else ""
        return f"{self.done:,.0f}{of} {self.unit}"

    def info_text(self) -> str:
        return " | ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in self.fields.items()
        )

    def set_total(self, total: float) -> None:
        self.total = total
        if self.id is not None:
            self.reporter.progress.update(self.id, total=total)

    def advance(self, amount: float, **fields: object) -> None:
        self.update(self.done + amount, **fields)

    def update(self, completed: float | None = None, force: bool = False, **fields: object) -> None:
        """Record progress (and the latest `fields`, e.g. loss=...); a plain line is written
        when PLAIN_INTERVAL_S have passed since the last one, or with `force`."""
        if completed is not None:
            self.done = completed
        self.fields.update(fields)
        if self.id is not None:
            self.reporter.progress.update(self.id, completed=self.done)
            return
        now = time.monotonic()
        if force or now - self.last_line >= PLAIN_INTERVAL_S:
            self.last_line = now
            left = self.seconds_left()
            timing = f"{format_duration(self.elapsed())} elapsed"
            if left is not None:
                timing += f", {format_duration(left)} left"
            parts = [f"{self.description} {self.count_text()}", timing, self.info_text()]
            self.reporter.info(" | ".join(part for part in parts if part))

    def announce(self, message: str) -> None:
        """Show `message` at once; safe in a signal handler, which may run while the main
        thread is writing to stderr (so it neither prints through Python's buffers nor
        breaks the bar's drawing)."""
        if self.id is not None:
            self.note = message  # shown at the bar's next refresh
        elif not self.reporter.quiet:
            os.write(sys.stderr.fileno(), f"{self.description}: {message}\n".encode())

    def _close(self, summary: str) -> None:
        if self.id is not None:
            self.reporter.progress.remove_task(self.id)
            self.reporter.progress.refresh()  # or the next line is drawn below the stale bar
            self.id = None
        info = self.info_text()
        self.reporter.info(f"{summary} | {info}" if info else summary)

    def finish(self, **fields: object) -> None:
        """End the stage with its summary line: what was done, in how long."""
        self.fields.update(fields)
        self._close(
            f"{self.description} done: {self.count_text(with_total=False)} in "
            f"{format_duration(self.elapsed())}"
        )

    def stop(self, reason: str) -> None:
        """End the stage early, e.g. `stop("interrupted")`, with where it stopped."""
        self._close(
            f"{self.description} {reason} at {self.count_text()} after "
            f"{format_duration(self.elapsed())}"
        )


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
        if interactive and not self.quiet:
            self.progress = Progress(
                TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=BAR_WIDTH),
                StatusColumn(self.console),
                console=self.console,
                transient=True,
            )
            self.progress.start()

    def start_task(
        self, description: str, total: float | None, unit: str = "steps", completed: float = 0.0
    ) -> Task:
        return Task(self, description, total, unit, completed)

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

"""What a run measures as it goes: per-step statistics kept on the device, and
metrics.jsonl, appended to (never rewritten) as records come."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from noodle.device import HostCopy
from noodle.errors import NoodleError
from noodle.files import atomic_write_bytes
from noodle.progress import Reporter
from noodle.train.settings import TrainState
from noodle.train.tensorboard_sink import TensorBoardSink


class StatsReading:
    """The statistics of a window of steps, on their way to host memory: on a GPU the copy
    completes once the steps queued before it do, and until then training goes on."""

    def __init__(self, values: torch.Tensor, steps: int, tokens: int, seconds: float) -> None:
        self.steps, self.tokens, self.seconds = steps, tokens, seconds
        self.values = HostCopy(values)

    def ready(self) -> bool:
        return self.values.ready()

    def result(self) -> tuple[float, float, int, int, int]:
        """(mean finite loss, tokens/s, non-finite steps, non-finite in a row now, longest
        run of them so far); waits for the copy if it is not done."""
        loss_sum, finite, *counts = self.values.tolist()
        mean_loss = loss_sum / finite if finite else math.nan
        nonfinite, in_row, longest = (int(v) for v in counts)
        return mean_loss, self.tokens / max(self.seconds, 1e-9), nonfinite, in_row, longest


class StepStats:
    """Per-step loss and non-finite counts kept as device tensors, so a step never waits
    for the host; they are read together, at log intervals without waiting (see
    `StatsReading`) and when the resume state is saved."""

    def __init__(self, device: torch.device, state: TrainState) -> None:
        def scalar(value: float) -> torch.Tensor:
            return torch.full((), float(value), device=device)

        self.loss_sum, self.finite_steps = scalar(0), scalar(0)
        self.nonfinite_total = scalar(state.nonfinite_steps)
        self.nonfinite_in_row = scalar(state.nonfinite_in_row)
        self.longest_nonfinite_in_row = scalar(state.nonfinite_in_row)
        self.window_steps, self.window_tokens = 0, 0
        self.window_started = time.monotonic()

    def add(
        self, loss: torch.Tensor, skipped: torch.Tensor, diverging: torch.Tensor, tokens: int
    ) -> None:
        self.loss_sum += torch.where(skipped, 0.0, loss)
        self.finite_steps += (~skipped).float()
        self.nonfinite_total += skipped.float()
        self.nonfinite_in_row.add_(1).mul_(diverging)
        torch.maximum(
            self.longest_nonfinite_in_row, self.nonfinite_in_row, out=self.longest_nonfinite_in_row
        )
        self.window_steps += 1
        self.window_tokens += tokens

    def values(self) -> torch.Tensor:
        return torch.stack(
            [
                self.loss_sum,
                self.finite_steps,
                self.nonfinite_total,
                self.nonfinite_in_row,
                self.longest_nonfinite_in_row,
            ]
        )

    def store(self, state: TrainState) -> int:
        """Copy the non-finite counts into `state` (waiting for the device); returns the
        longest run of them so far."""
        counts = [int(v) for v in self.values().tolist()[2:]]
        state.nonfinite_steps, state.nonfinite_in_row, longest = counts
        return longest

    def take_window(self) -> StatsReading:
        """The statistics since the last call, on their way to the host; starts a new
        window (the counters are cleared after the copy, on the device's queue)."""
        elapsed = time.monotonic() - self.window_started
        reading = StatsReading(self.values(), self.window_steps, self.window_tokens, elapsed)
        self.loss_sum.zero_(), self.finite_steps.zero_()
        self.window_steps, self.window_tokens = 0, 0
        self.restart_clock()
        return reading

    def restart_clock(self) -> None:
        self.window_started = time.monotonic()


def json_safe(value: object) -> object:
    # NaN and infinity are not JSON: a diverged loss or no best loss yet is null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl: one JSON object per line, appended as records come; with
    `tensorboard_dir`, every record also goes to TensorBoard (see tensorboard_sink).

    A crash can leave a torn last line; `truncate` (called when a run resumes) drops it,
    along with the records logged after the step the run resumes from. Without a path
    (the processes of a run other than the first) it records nothing.
    """

    def __init__(self, path: Path | None, tensorboard_dir: str | None = None) -> None:
        self.path = path
        self.pending: list[str] = []
        self.sinks = [TensorBoardSink(Path(tensorboard_dir))] if tensorboard_dir else []

    def record(self, **values: object) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **{k: json_safe(v) for k, v in values.items()}}
        self.pending.append(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def flush(self) -> None:
        """Append the pending records (to the OS: `sync` makes them durable)."""
        for sink in self.sinks:
            sink.flush()
        if not self.pending or self.path is None:
            return
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("".join(self.pending))
        except OSError as exc:
            raise NoodleError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.pending = []

    def close(self) -> None:
        """Flush, and close what the sinks hold open."""
        self.flush()
        for sink in self.sinks:
            sink.close()

    def sync(self) -> None:
        """Make what was appended so far durable."""
        if self.path is not None and self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def truncate(self, last_step: int, reporter: Reporter) -> None:
        """Keep the records up to `last_step`; drop later ones, a torn last line and (with
        a warning) any line that is not a JSON record."""
        for sink in self.sinks:
            sink.truncate(last_step)
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept, damaged = [], []
        for number, line in enumerate(lines, 1):
            try:
                kept_it = json.loads(line).get("step", 0) <= last_step
            except (json.JSONDecodeError, AttributeError, TypeError):
                if number < len(lines) and line.strip():  # a torn last line is expected
                    damaged.append(number)
                continue
            if kept_it:
                kept.append(line + "\n")
        if damaged:
            reporter.warn(
                f"{self.path}: dropped {len(damaged)} damaged line(s) (line {damaged[0]}"
                f"{' and more' if len(damaged) > 1 else ''})"
            )
        atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))

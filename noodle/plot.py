"""`noodle plot`: the training curves of one or more runs, drawn from their metrics.jsonl.

Training and validation loss against tokens seen, with the learning rate below, one colour
per run and the best checkpoint (the lowest validation loss, the weights a run keeps)
marked. matplotlib is an optional extra (`pip install 'noodle[plot]'`); it draws headless.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from noodle.checkpoint import METRICS, MODEL_JSON, WEIGHTS
from noodle.errors import NoodleError, UsageError
from noodle.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
SIZE_PATTERN = re.compile(r"(\d+)x(\d+)")


@dataclass
class RunCurves:
    """One run's curves; tokens are the x axis of every series."""

    label: str
    train_tokens: np.ndarray
    train_loss: np.ndarray
    lr: np.ndarray
    eval_tokens: np.ndarray
    val_loss: np.ndarray

    @property
    def best(self) -> int | None:
        """Index of the best evaluation: the first lowest validation loss, as training
        saves weights only on a strict improvement."""
        finite = np.isfinite(self.val_loss)
        if not finite.any():
            return None
        return int(np.argmin(np.where(finite, self.val_loss, np.inf)))


def number(value: object) -> float:
    """A recorded number; null (a non-finite loss) becomes NaN, a gap in the curve."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def metrics_path(spec: str) -> Path:
    """metrics.jsonl of MODEL_DIR (or of the directory of a file in it)."""
    path = Path(spec)
    if path.is_file() and path.name in (METRICS, MODEL_JSON, WEIGHTS):
        path = path.parent
    if not path.exists():
        raise NoodleError(f"run {spec}: no such directory")
    if not path.is_dir():
        raise NoodleError(f"run {spec}: expected a model directory")
    metrics = path / METRICS
    if not metrics.is_file():
        raise NoodleError(f"run {spec}: {path} has no {METRICS} (not a training run's directory)")
    return metrics


def read_records(metrics: Path) -> list[dict]:
    """The JSON records of metrics.jsonl; lines that are not one (a line torn by a crash)
    are left out."""
    try:
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise NoodleError(f"{metrics}: cannot read ({exc.strerror or exc})") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_run(spec: str) -> RunCurves:
    metrics = metrics_path(spec)
    records = read_records(metrics)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise NoodleError(f"run {spec}: {metrics} holds no training records yet")
    steps = np.array([0] + [r["step"] for r in train], dtype=float)
    tokens = np.array([0.0] + [number(r.get("tokens_seen")) for r in train])
    # Evaluation records carry a step, not tokens: the tokens seen at that step, from the
    # training records around it (exact when the tokens per step do not change).
    eval_steps = np.array([r["step"] for r in evals], dtype=float)
    return RunCurves(
        label=spec.rstrip("/") or spec,
        train_tokens=tokens[1:],
        train_loss=np.array([number(r.get("loss")) for r in train]),
        lr=np.array([number(r.get("lr")) for r in train]),
        eval_tokens=np.interp(eval_steps, steps, tokens),
        val_loss=np.array([number(r.get("val_loss")) for r in evals]),
    )


def parse_size(size: str) -> tuple[int, int]:
    """WIDTHxHEIGHT in pixels."""
    match = SIZE_PATTERN.fullmatch(size.strip())
    if not match or min(int(match[1]), int(match[2])) < 100:
        raise UsageError(f"--size must be WIDTHxHEIGHT in pixels, each at least 100, got {size!r}")
    return int(match[1]), int(match[2])


def figure_class() -> type[Figure]:
    """matplotlib's Figure, which draws without a display (no pyplot, no GUI backend)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise NoodleError(
            "noodle plot needs matplotlib: pip install 'noodle[plot]' (or pip install matplotlib)"
        ) from None
    return Figure


def draw(runs: list[RunCurves], size: tuple[int, int]) -> Figure:
    """Loss above, learning rate below, against tokens seen."""
    from matplotlib.ticker import EngFormatter

    figure = figure_class()(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        loss_axes.plot(
            run.train_tokens,
            run.train_loss,
            color=color,
            alpha=0.6,
            lw=1.2,
            label=f"{run.label} · training",
        )
        loss_axes.plot(
            run.eval_tokens,
            run.val_loss,
            color=color,
            lw=2,
            marker="o",
            ms=3,
            label=f"{run.label} · validation",
        )
        if (best := run.best) is not None:
            loss_axes.plot(
                run.eval_tokens[best],
                run.val_loss[best],
                color=color,
                marker="*",
                ms=14,
                mec="black",
                ls="none",
                label=f"{run.label} · best {run.val_loss[best]:.3f}",
            )
        lr_axes.plot(run.train_tokens, run.lr, color=color, lw=1.5)
    loss_axes.set_ylabel("loss (nats per token)")
    loss_axes.set_title("training curves")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(fontsize="small")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("tokens seen")
    lr_axes.grid(alpha=0.3)
    lr_axes.xaxis.set_major_formatter(EngFormatter())
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return figure


def check_output(output: Path) -> str:
    """The image format `output`'s suffix names; refused before anything is drawn."""
    formats = figure_class()().canvas.get_supported_filetypes()
    image_format = output.suffix.removeprefix(".").lower()
    if image_format not in formats:
        raise UsageError(
            f"cannot write {output}: name a file ending in one of "
            f"{', '.join('.' + name for name in sorted(formats))}"
        )
    if not output.parent.is_dir():
        raise NoodleError(f"cannot write {output}: {output.parent} is not a directory")
    return image_format


def plot_runs(specs: list[str], output: Path, size: tuple[int, int]) -> None:
    """Draw the runs at `specs` into the image file `output`."""
    runs = [read_run(spec) for spec in specs]
    image_format = check_output(output)
    figure = draw(runs, size)
    atomic_write(output, lambda handle: figure.savefig(handle, format=image_format, dpi=DPI))

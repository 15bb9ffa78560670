"""`--tensorboard DIR`: the metrics records, also written as TensorBoard scalars.

Each number of a record becomes the scalar KIND/NAME at the record's step ("train/loss",
"train/lr", "eval/val_loss", ...). The writer is torch.utils.tensorboard's, which needs the
`tensorboard` package (`pip install 'noodle[tensorboard]'`); it is imported only when
records come, so this module loads without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from noodle.errors import NoodleError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# What locates a record rather than measures something.
NOT_SCALARS = frozenset({"kind", "step", "time"})


def check_tensorboard(log_dir: str) -> None:
    """Refuse --tensorboard DIR at once, before any training: without the tensorboard
    package, or when DIR is a file."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise NoodleError(
            "--tensorboard needs the tensorboard package: pip install 'noodle[tensorboard]' "
            "(or pip install tensorboard)"
        ) from None
    if Path(log_dir).exists() and not Path(log_dir).is_dir():
        raise NoodleError(f"--tensorboard {log_dir} is a file; name a directory")


class TensorBoardSink:
    """Writes metrics records to an event file in `log_dir`, opened at the first record."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: SummaryWriter | None = None
        self.purge_step: int | None = None

    def truncate(self, last_step: int) -> None:
        """The run resumes after `last_step`: TensorBoard hides what an earlier attempt
        logged past it, as metrics.jsonl drops those records."""
        self.purge_step = last_step + 1

    def write(self, record: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        kind, step, walltime = record.get("kind"), record.get("step"), record.get("time")
        for name, value in record.items():
            if name in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(f"{kind}/{name}", value, step, walltime=walltime)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

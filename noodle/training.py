"""The training loop, shared by `noodle train` and `noodle finetune`.

It owns optimisation, evaluation, best-checkpoint and early-stopping rules, the non-finite
loss guard, logging, resume state and interrupt handling. What it trains on comes in as
two data objects (see `TrainData` and `EvalData`), what it saves goes through `ModelDir`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from types import FrameType
from typing import Any, Protocol

import torch
from torch import nn

from noodle.batching import Batch
from noodle.checkpoint import ModelDir, unwrap
from noodle.device import autocast, release_free_memory
from noodle.errors import Interrupted, NoodleError
from noodle.progress import Reporter, Task, format_duration

MIN_LR_FRACTION = 0.1


class TrainData(Protocol):
    batch_size: int

    def batches_per_epoch(self) -> int: ...

    def get(self, epoch: int, index: int) -> Batch: ...


class EvalData(Protocol):
    def eval_batches(self, max_batches: int) -> Iterator[Batch]: ...


@dataclass
class TrainSettings:
    max_epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 2e-4
    eval_interval: int = 200
    eval_batches: int = 50
    patience: int = 10
    min_improvement: float = 0.01
    seed: int = 1337
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 100
    log_interval: int = 10
    max_nonfinite_in_row: int = 5
    compile: bool = False
    # CUDA graphs replay each step's ~200 kernels with one launch: small models are bound by
    # kernel-launch overhead otherwise (somen at batch 8 spends most of its step on the CPU).
    compile_mode: str = "reduce-overhead"


@dataclass
class TrainState:
    """Where a run stands; saved with the resume state, so every field is plain JSON."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    tokens_seen: int = 0
    best_loss: float = math.inf
    best_step: int = 0
    patience_reference: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_row: int = 0
    stopped_early: bool = False


# The settings that decide which weights a run ends with: resuming with any of them changed
# would silently give another run, so it is refused. The run's length (max epochs/steps)
# may change, to continue a finished run further; logging settings may change too.
RESUME_SETTINGS = (
    "batch_size",
    "lr",
    "eval_interval",
    "eval_batches",
    "patience",
    "min_improvement",
    "seed",
    "weight_decay",
    "grad_clip",
    "warmup_steps",
)

# Rewriting metrics.jsonl costs more as it grows; at log intervals it is flushed only while
# that keeps the time spent writing it under 1/METRICS_FLUSH_COST_RATIO of the run.
METRICS_FLUSH_COST_RATIO = 50


def settings_fingerprint(settings: TrainSettings) -> dict:
    return {name: getattr(settings, name) for name in RESUME_SETTINGS}


def first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    """The first entry of `current` that `saved` disagrees with, described, or None."""
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            found = first_difference(old, value, f"{prefix}{key}.")
            if found:
                return found
        elif old != value:
            return f"{prefix}{key} was {old!r}, now {value!r}"
    return None


def check_resumable(out: ModelDir, fingerprint: dict) -> None:
    """Refuse to resume the run saved in `out` unless it matches `fingerprint` (the
    architecture, tokenizer, corpus and settings, or whichever of them are given)."""
    difference = first_difference(out.read_resume_metadata()["fingerprint"], fingerprint)
    if difference:
        raise NoodleError(
            f"cannot resume {out.path}: the run differs from the interrupted one "
            f"({difference}); resume with the same corpus, model and options"
        )


def planned_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    total = settings.max_epochs * batches_per_epoch
    return min(total, settings.max_steps) if settings.max_steps else total


def learning_rate(step: int, settings: TrainSettings, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the planned last step."""
    warmup = min(settings.warmup_steps, max(1, total // 10))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW that decays the matrices (linear and embedding weights) but not biases or norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterator[Batch], device: torch.device, amp_dtype: torch.dtype
) -> float:
    """Mean cross-entropy per predicted token over `batches`."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        predicted = int((targets != -100).sum())
        with autocast(device, amp_dtype):
            loss = model(inputs, targets)
        total += loss.double() * predicted
        count += predicted
    model.train(was_training)
    return float(total) / max(count, 1)


class SignalCatcher:
    """Turns the first SIGINT/SIGTERM into a flag the training loop checks between steps, so
    the step in progress finishes and the resume state can be saved; a second one
    interrupts at once (every file on disk stays consistent either way)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise Interrupted(signum)
        self.received = signum

    def __enter__(self) -> SignalCatcher:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StepStats:
    """Per-step loss and non-finite counts kept as device tensors, so a step never waits
    for the host; they are read only at log intervals and when the resume state is saved."""

    def __init__(self, device: torch.device, state: TrainState) -> None:
        def scalar(value: float) -> torch.Tensor:
            return torch.full((), float(value), device=device)

        self.loss_sum, self.finite_steps = scalar(0), scalar(0)
        self.nonfinite_total = scalar(state.nonfinite_steps)
        self.nonfinite_in_row = scalar(state.nonfinite_in_row)
        self.longest_nonfinite_in_row = scalar(state.nonfinite_in_row)
        self.window_steps, self.window_tokens = 0, 0
        self.window_started = time.monotonic()

    def add(self, loss: torch.Tensor, nonfinite: torch.Tensor, tokens: int) -> None:
        self.loss_sum += torch.where(nonfinite, 0.0, loss)
        self.finite_steps += (~nonfinite).float()
        self.nonfinite_total += nonfinite.float()
        self.nonfinite_in_row.add_(1).mul_(nonfinite)
        torch.maximum(
            self.longest_nonfinite_in_row, self.nonfinite_in_row, out=self.longest_nonfinite_in_row
        )
        self.window_steps += 1
        self.window_tokens += tokens

    def store(self, state: TrainState) -> int:
        """Copy the non-finite counts into `state`; returns the longest run of them so far."""
        state.nonfinite_steps = int(self.nonfinite_total)
        state.nonfinite_in_row = int(self.nonfinite_in_row)
        return int(self.longest_nonfinite_in_row)

    def take_window(self) -> tuple[float, float, float]:
        """(mean finite loss, seconds per step, tokens/s) since the last call; starts anew."""
        finite = int(self.finite_steps)
        mean_loss = float(self.loss_sum) / finite if finite else math.nan
        elapsed = max(time.monotonic() - self.window_started, 1e-9)
        seconds_per_step = elapsed / max(self.window_steps, 1)
        tokens_per_second = self.window_tokens / elapsed
        self.loss_sum.zero_(), self.finite_steps.zero_()
        self.window_steps, self.window_tokens = 0, 0
        self.restart_clock()
        return mean_loss, seconds_per_step, tokens_per_second

    def restart_clock(self) -> None:
        self.window_started = time.monotonic()


class Trainer:
    """Runs one training job over `train_data`, evaluating on `eval_data`.

    `fingerprint` identifies what the run trains (architecture, tokenizer, data); with the
    settings that decide its outcome it is saved in the resume state, and `resume()`
    refuses a saved run that does not match. `on_best(state)` is called after the weights
    of a new best validation loss were saved, so the caller can write its metadata.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: TrainData,
        eval_data: EvalData,
        settings: TrainSettings,
        out: ModelDir,
        device: torch.device,
        amp_dtype: torch.dtype,
        reporter: Reporter,
        fingerprint: dict,
        on_best: Callable[[TrainState], None] = lambda state: None,
    ) -> None:
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.settings, self.out, self.device, self.amp_dtype = settings, out, device, amp_dtype
        self.reporter, self.on_best = reporter, on_best
        self.fingerprint = {**fingerprint, "settings": settings_fingerprint(settings)}
        self.optimizer = make_optimizer(model, settings)
        # The compiled module shares the model's parameters; saving goes through unwrap().
        self.step_model = (
            torch.compile(model, mode=settings.compile_mode) if settings.compile else model
        )
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.stats = StepStats(device, self.state)
        self.batches_per_epoch = train_data.batches_per_epoch()
        self.total_steps = planned_steps(settings, self.batches_per_epoch)
        self.pending_metrics: list[dict] = []
        self.last_flush_end, self.last_flush_seconds = time.monotonic(), 0.0

    # -- resume state -----------------------------------------------------------------

    def save_resume_state(self) -> None:
        self.raise_if_diverged(self.stats.store(self.state))
        tensors = {f"model.{k}": v for k, v in unwrap(self.model).state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = value
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        elif self.device.type == "mps":
            tensors["rng.mps"] = torch.mps.get_rng_state()
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        state = {
            "train_state": asdict(self.state),
            "param_groups": optimizer["param_groups"],
            "fingerprint": self.fingerprint,
        }
        # Metrics first: a crash between the two leaves records past the saved step, which
        # resuming truncates, never a resume point with missing records.
        self.flush_metrics()
        self.out.save_resume_state(tensors, state)

    def resume(self) -> None:
        """Continue the run saved in the output directory exactly where it stopped."""
        check_resumable(self.out, self.fingerprint)
        self.out.remove_temporary_files()
        tensors, saved = self.out.load_resume_state()
        model_state = {
            k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")
        }
        unwrap(self.model).load_state_dict(model_state)
        optimizer_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(
            {"state": optimizer_state, "param_groups": saved["param_groups"]}
        )
        torch.set_rng_state(tensors["rng.cpu"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        elif self.device.type == "mps" and "rng.mps" in tensors:
            torch.mps.set_rng_state(tensors["rng.mps"])
        known = {f.name for f in fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in saved["train_state"].items() if k in known})
        self.stats = StepStats(self.device, self.state)
        self.out.truncate_metrics(self.state.step)
        self.reporter.info(
            f"resuming at step {self.state.step} (epoch {self.state.epoch + 1}, "
            f"best validation loss {self.state.best_loss:.4f})"
        )

    # -- logging --------------------------------------------------------------------------

    def record(self, **values: object) -> None:
        # NaN and infinity are not JSON; a diverged loss or no best loss yet is null.
        values = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()
        }
        self.pending_metrics.append({"time": round(time.time(), 3), **values})

    def flush_metrics(self) -> None:
        started = time.monotonic()
        self.out.append_metrics(self.pending_metrics)
        self.pending_metrics = []
        self.last_flush_end = time.monotonic()
        self.last_flush_seconds = self.last_flush_end - started

    def flush_metrics_if_cheap(self) -> None:
        since_last = time.monotonic() - self.last_flush_end
        if since_last >= METRICS_FLUSH_COST_RATIO * self.last_flush_seconds:
            self.flush_metrics()

    def raise_if_diverged(self, longest_nonfinite_in_row: int) -> None:
        """Stop the run once too many steps in a row had a non-finite loss or gradient."""
        limit = self.settings.max_nonfinite_in_row
        if longest_nonfinite_in_row < limit:
            return
        self.flush_metrics()
        state = self.state
        if state.best_step:
            kept = (
                f"the best weights (step {state.best_step}, validation loss "
                f"{state.best_loss:.4f}) are kept in {self.out.path}"
            )
        else:
            kept = "no weights had been saved yet"
        raise NoodleError(
            f"training diverged: the loss was not finite for {limit} steps in a row (by step "
            f"{state.step}); {kept}; train again with a lower --lr into a new output directory"
        )

    def log(self, lr: float, task: Task) -> None:
        state = self.state
        longest_nonfinite_in_row = self.stats.store(state)
        mean_loss, seconds_per_step, tokens_per_second = self.stats.take_window()
        self.record(
            kind="train",
            step=state.step,
            epoch=state.epoch,
            loss=mean_loss,
            lr=lr,
            tokens_per_second=round(tokens_per_second, 1),
            tokens_seen=state.tokens_seen,
            nonfinite_steps=state.nonfinite_steps,
        )
        self.raise_if_diverged(longest_nonfinite_in_row)
        self.flush_metrics_if_cheap()
        task.update(
            completed=state.step,
            loss=f"{mean_loss:.4f}",
            lr=f"{lr:.2e}",
            tok_s=f"{tokens_per_second:,.0f}",
            eta=format_duration((self.total_steps - state.step) * seconds_per_step),
        )

    # -- evaluation -------------------------------------------------------------------

    def run_evaluation(self) -> None:
        state, settings = self.state, self.settings
        # The evaluation's logits cannot reuse the blocks the training step freed (see
        # release_free_memory): hand those pages back rather than hold both, at the price of
        # faulting them in again once per evaluation.
        release_free_memory()
        loss = evaluate(
            self.step_model,
            self.eval_data.eval_batches(settings.eval_batches),
            self.device,
            self.amp_dtype,
        )
        improved = loss < state.best_loss
        if improved:
            state.best_loss, state.best_step = loss, state.step
            self.out.save_weights(self.model)
            self.on_best(state)
        if loss <= state.patience_reference - settings.min_improvement:
            state.patience_reference = loss
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        if state.evals_without_improvement >= settings.patience:
            state.stopped_early = True
        self.record(
            kind="eval",
            step=state.step,
            epoch=state.epoch,
            val_loss=loss,
            best_val_loss=state.best_loss,
        )
        mark = " (best, saved)" if improved else ""
        self.reporter.info(
            f"eval step {state.step} | val loss {loss:.4f} | best {state.best_loss:.4f}{mark}"
        )
        self.save_resume_state()
        self.stats.restart_clock()

    # -- the loop ---------------------------------------------------------------------

    def device_batch(self, epoch: int, index: int) -> Batch:
        """A training batch on the device; on CUDA copied from pinned memory asynchronously."""
        inputs, targets = self.train_data.get(epoch, index)
        if self.device.type == "cuda":
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return (
            inputs.to(self.device, non_blocking=True),
            targets.to(self.device, non_blocking=True),
        )

    def train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the loss and whether the step was skipped because
        the loss or the gradient was not finite (both stay on the device)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.amp_dtype):
            loss = self.step_model(inputs, targets)
        loss.backward()
        grad_norm = nn.utils.get_total_norm([p.grad for p in self.parameters])
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        # The fused AdamW kernel divides the gradients by grad_scale and skips its whole
        # update (and step count) where found_inf is set: the mechanism GradScaler uses.
        # So clipping costs no extra pass over the gradients and the NaN guard no host sync.
        self.optimizer.grad_scale = torch.clamp(grad_norm / self.settings.grad_clip, min=1.0)
        self.optimizer.found_inf = nonfinite.float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), nonfinite

    def run(self) -> TrainState:
        """Train to the planned last step or an early stop (after `resume()`, from where
        the saved run stopped). SIGINT/SIGTERM save the resume state and raise Interrupted."""
        settings, state = self.settings, self.state
        self.model.train()
        task = self.reporter.start_task("training", total=self.total_steps)
        task.update(completed=state.step)
        self.stats.restart_clock()
        with SignalCatcher() as signals:
            while not state.stopped_early and state.step < self.total_steps:
                if state.batch_index >= self.batches_per_epoch:
                    state.epoch, state.batch_index = state.epoch + 1, 0
                inputs, targets = self.device_batch(state.epoch, state.batch_index)
                lr = learning_rate(state.step, settings, self.total_steps)
                loss, nonfinite = self.train_step(inputs, targets, lr)
                self.stats.add(loss, nonfinite, inputs.numel())
                state.step += 1
                state.batch_index += 1
                state.tokens_seen += inputs.numel()
                epoch_done = state.batch_index >= self.batches_per_epoch
                last = state.step >= self.total_steps
                if state.step % settings.log_interval == 0 or epoch_done or last:
                    self.log(lr, task)
                if state.step % settings.eval_interval == 0 or epoch_done or last:
                    self.run_evaluation()
                elif signals.received is not None:
                    self.save_resume_state()
                if signals.received is not None:
                    task.finish()
                    raise Interrupted(signals.received, resume_step=state.step)
        self.flush_metrics()
        task.finish()
        if state.stopped_early:
            self.reporter.info(
                f"early stop: no improvement of {settings.min_improvement} in "
                f"{settings.patience} evaluations"
            )
        return state

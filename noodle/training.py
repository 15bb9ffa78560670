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
from typing import Protocol

import torch
from torch import nn

from noodle.batching import Batch
from noodle.checkpoint import ModelDir, unwrap
from noodle.device import autocast
from noodle.errors import NoodleError
from noodle.progress import Reporter, format_duration

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
    last_eval_step: int = -1
    nonfinite_steps: int = 0
    stopped_early: bool = False


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the resume state was saved before this was raised."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one
    interrupts at once (the files on disk stay consistent either way)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> SignalCatcher:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs one training job over `train_data`, evaluating on `eval_data`.

    `on_best(state)` is called after the weights of a new best validation loss were
    saved, so the caller can write its metadata.
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
        self.reporter, self.fingerprint, self.on_best = reporter, fingerprint, on_best
        self.optimizer = make_optimizer(model, settings)
        # The compiled module shares the model's parameters; saving goes through unwrap().
        self.step_model = (
            torch.compile(model, mode=settings.compile_mode) if settings.compile else model
        )
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.batches_per_epoch = train_data.batches_per_epoch()
        self.total_steps = planned_steps(settings, self.batches_per_epoch)
        self.pending_metrics: list[dict] = []

    # -- resume state -----------------------------------------------------------------

    def save_resume_state(self) -> None:
        tensors = {f"model.{k}": v for k, v in unwrap(self.model).state_dict().items()}
        optim = self.optimizer.state_dict()
        for index, values in optim["state"].items():
            for key, value in values.items():
                tensors[f"optim.{index}.{key}"] = value
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        state = {
            "train_state": asdict(self.state),
            "param_groups": optim["param_groups"],
            "fingerprint": self.fingerprint,
        }
        self.flush_metrics()
        self.out.save_resume_state(tensors, state)

    def load_resume_state(self) -> None:
        tensors, saved = self.out.load_resume_state()
        for key, value in self.fingerprint.items():
            if saved["fingerprint"].get(key) != value:
                raise NoodleError(
                    f"cannot resume {self.out.path}: {key} differs from the interrupted run "
                    f"(was {saved['fingerprint'].get(key)!r}, now {value!r})"
                )
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        unwrap(self.model).load_state_dict(model_state)
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(
            {"state": optim_state, "param_groups": saved["param_groups"]}
        )
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        known = {f.name for f in fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in saved["train_state"].items() if k in known})
        self.out.truncate_metrics(self.state.step)
        self.reporter.info(
            f"resuming at step {self.state.step} (epoch {self.state.epoch + 1}, "
            f"best validation loss {self.state.best_loss:.4f})"
        )

    # -- logging --------------------------------------------------------------------------

    def record(self, **values) -> None:
        self.pending_metrics.append({"time": round(time.time(), 3), **values})

    def flush_metrics(self) -> None:
        self.out.append_metrics(self.pending_metrics)
        self.pending_metrics = []

    # -- evaluation -------------------------------------------------------------------

    def run_evaluation(self) -> None:
        state, settings = self.state, self.settings
        loss = evaluate(
            self.step_model,
            self.eval_data.eval_batches(settings.eval_batches),
            self.device,
            self.amp_dtype,
        )
        state.last_eval_step = state.step
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

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.amp_dtype):
            loss = self.step_model(inputs, targets)
        loss.backward()
        grad_norm = nn.utils.get_total_norm([p.grad for p in self.parameters])
        nonfinite = ~torch.isfinite(grad_norm)
        # The fused AdamW kernel divides the gradients by grad_scale and skips its whole
        # update (and step count) where found_inf is set: the mechanism GradScaler uses.
        # So clipping costs no extra pass over the gradients and the NaN guard no host sync.
        self.optimizer.grad_scale = torch.clamp(grad_norm / self.settings.grad_clip, min=1.0)
        self.optimizer.found_inf = nonfinite.float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), nonfinite

    def run(self, resume: bool = False) -> TrainState:
        settings, state = self.settings, self.state
        if resume:
            self.load_resume_state()
            state = self.state
        self.model.train()
        task = self.reporter.start_task("training", total=self.total_steps)
        task.update(completed=state.step)
        window_loss = torch.zeros((), device=self.device)
        window_finite = torch.zeros((), device=self.device)
        nonfinite_run = torch.zeros((), device=self.device)
        longest_nonfinite_run = torch.zeros((), device=self.device)
        window_start, window_tokens, window_step = time.monotonic(), 0, state.step
        with SignalCatcher() as signals:
            while not state.stopped_early and state.step < self.total_steps:
                if state.batch_index >= self.batches_per_epoch:
                    state.epoch, state.batch_index = state.epoch + 1, 0
                    continue
                inputs, targets = self.device_batch(state.epoch, state.batch_index)
                lr = learning_rate(state.step, settings, self.total_steps)
                loss, nonfinite = self.train_step(inputs, targets, lr)
                window_loss += torch.where(nonfinite, 0.0, loss)
                window_finite += (~nonfinite).float()
                nonfinite_run = (nonfinite_run + 1) * nonfinite
                longest_nonfinite_run = torch.maximum(longest_nonfinite_run, nonfinite_run)
                state.step += 1
                state.batch_index += 1
                state.tokens_seen += inputs.numel()
                window_tokens += inputs.numel()
                epoch_done = state.batch_index >= self.batches_per_epoch
                last = state.step >= self.total_steps
                if state.step % settings.log_interval == 0 or epoch_done or last:
                    finite_steps = int(window_finite)
                    skipped = state.step - window_step - finite_steps
                    state.nonfinite_steps += skipped
                    elapsed = max(time.monotonic() - window_start, 1e-9)
                    mean_loss = float(window_loss) / finite_steps if finite_steps else math.nan
                    tokens_per_s = window_tokens / elapsed
                    seconds_per_step = elapsed / (state.step - window_step)
                    eta = format_duration((self.total_steps - state.step) * seconds_per_step)
                    self.record(
                        kind="train",
                        step=state.step,
                        epoch=state.epoch,
                        loss=mean_loss,
                        lr=lr,
                        tokens_per_second=round(tokens_per_s, 1),
                        tokens_seen=state.tokens_seen,
                        nonfinite_steps=state.nonfinite_steps,
                    )
                    task.update(
                        completed=state.step,
                        loss=f"{mean_loss:.4f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{tokens_per_s:,.0f}",
                        eta=eta,
                    )
                    if int(longest_nonfinite_run) >= settings.max_nonfinite_in_row:
                        self.flush_metrics()
                        raise NoodleError(
                            f"training diverged: {settings.max_nonfinite_in_row} non-finite "
                            f"losses in a row at step {state.step}; the best checkpoint in "
                            f"{self.out.path} is kept (try a lower --lr)"
                        )
                    window_loss.zero_(), window_finite.zero_()
                    window_start, window_tokens, window_step = time.monotonic(), 0, state.step
                if state.step % settings.eval_interval == 0 or epoch_done or last:
                    self.run_evaluation()
                    window_start = time.monotonic()
                elif signals.received is not None:
                    self.save_resume_state()
                if signals.received is not None:
                    task.finish()
                    raise Interrupted(signals.received)
        if state.last_eval_step != state.step:
            self.run_evaluation()
        self.flush_metrics()
        task.finish()
        if state.stopped_early:
            self.reporter.info(
                f"early stop: no improvement of {settings.min_improvement} in "
                f"{settings.patience} evaluations"
            )
        return state

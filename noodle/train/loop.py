"""The training loop, shared by `noodle train` and `noodle finetune`.

The Trainer runs the steps, evaluates, keeps the best weights, stops early, saves the
resume state and handles signals. The rest is delegated: the optimizer step (clipping, the
non-finite guard, any optimizers) to `optim`, what the resume state holds to `resume`,
statistics and metrics.jsonl to `metrics`, writing files off the training thread to
`writer`, and compiling or wrapping the model to `parallel`. What it trains on comes in
as two data objects (`TrainData`, `EvalData`); what it saves goes through `ModelDir`.

In a run of several processes every process runs this loop in step with the others, on its
share of each global batch; `parallel` agrees on what they must agree on (the step's loss,
the validation loss, when to save or stop), and only the first process writes.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import FrameType
from typing import Any, Protocol

import torch
from torch import nn

from noodle.batching import Batch, to_device
from noodle.checkpoint import METRICS, BestWeights, ModelDir
from noodle.device import HostCopy, autocast, peak_memory
from noodle.errors import STOP_SIGNALS, Interrupted, NoodleError
from noodle.evaluation import loss_sums
from noodle.loss import FUSED_CHUNK
from noodle.memory import release_free_memory
from noodle.parallel import Parallel
from noodle.progress import Reporter, Task
from noodle.train.metrics import MetricsLog, StatsReading, StepStats
from noodle.train.optim import LossScale, OptimizerStep, Schedule, StepOutcome, build_optimizers
from noodle.train.resume import (
    TrainingParts,
    check_resumable,
    restore,
    resume_metadata,
    resume_tensors,
    trained_state,
)
from noodle.train.settings import TrainSettings, TrainState, planned_steps
from noodle.train.writer import Writer


class TrainData(Protocol):
    batch_size: int

    def batches_per_epoch(self) -> int: ...

    def take_share(self, rank: int, ranks: int) -> None: ...

    def get(self, epoch: int, index: int) -> Batch: ...


class EvalData(Protocol):
    def eval_batches(self, max_batches: int) -> Iterator[Batch]: ...


class SignalCatcher:
    """Turns the first SIGINT/SIGTERM into a flag the training loop checks between steps, so
    the step in progress finishes and the resume state can be saved; a second one
    interrupts at once (every file on disk stays consistent either way). `on_first(signum)`
    acknowledges the first at once, from the signal handler."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, on_first: Callable[[int], None] = lambda signum: None) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.on_first = on_first

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise Interrupted(signum)
        self.received = signum
        self.on_first(signum)

    def __enter__(self) -> SignalCatcher:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs one training job over `train_data`, evaluating on `eval_data`.

    `identity` (see `resume.run_identity`) is saved with the resume state, and `resume()`
    refuses a saved run that does not match it. `on_best(state)` is called once the
    weights of a new best validation loss are on disk, so the caller can describe them.
    `optimizers` replaces the ones `settings.optimizer` names.
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
        identity: dict,
        on_best: Callable[[TrainState], None] = lambda state: None,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.settings, self.out, self.device, self.amp_dtype = settings, out, device, amp_dtype
        self.reporter, self.identity, self.on_best = reporter, identity, on_best
        self.parallel = parallel or Parallel()
        train_data.take_share(self.parallel.rank, self.parallel.world_size)
        self.optimizers = build_optimizers(model, settings) if optimizers is None else optimizers
        # float16's narrow range loses small gradients to underflow without a loss scale.
        loss_scale = LossScale(device) if amp_dtype == torch.float16 else None
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer_step = OptimizerStep(
            parameters, self.optimizers, settings.grad_clip, loss_scale
        )
        self.parts = TrainingParts(model, self.optimizers, loss_scale, device, self.parallel)
        compile_mode = settings.compile_mode if settings.compile else None
        self.step_model = self.parallel.prepare_model(model, compile_mode)
        self.loss_chunk = settings.loss_chunk
        if self.loss_chunk is None:
            self.loss_chunk = FUSED_CHUNK if settings.compile else 0
        self.state = TrainState()
        self.stats = StepStats(device, self.state)
        self.batches_per_epoch = train_data.batches_per_epoch()
        self.schedule = Schedule.plan(settings, planned_steps(settings, self.batches_per_epoch))
        main = self.parallel.is_main
        self.metrics = MetricsLog(
            out.file(METRICS) if main else None, settings.tensorboard_dir if main else None
        )
        self.writer = Writer(background=device.type != "cpu", writes=main)
        self.last_save = time.monotonic()
        self.pending_log: tuple[StatsReading, dict] | None = None
        # The step of weights saved without an evaluation (see save_unevaluated_weights).
        self.unevaluated_weights_step: int | None = None

    # -- resume state -----------------------------------------------------------------

    def save_resume_state(self) -> None:
        """Snapshot the resume state now; it is written in the background (see Writer),
        after the metrics logged so far are durable: a crash between the two leaves
        records past the saved step, which resuming drops, never a resume point with
        missing records."""
        self.raise_if_diverged(self.stats.store(self.state))
        tensors = self.writer.snapshot(self.parallel.gathered(resume_tensors(self.parts)))
        metadata = resume_metadata(self.parts, self.state, self.schedule, self.identity)
        self.metrics.flush()
        metrics, out = self.metrics, self.out

        def write() -> None:
            metrics.sync()
            out.save_resume_state(tensors, metadata)

        self.writer.submit(write)
        self.last_save = time.monotonic()

    def resume(self) -> None:
        """Continue the run saved in the output directory exactly where it stopped. A run
        given another length keeps its learning rate and re-plans the rest of its decay
        (see `Schedule.replan`)."""
        check_resumable(self.out, self.identity)
        if self.parallel.is_main:
            self.out.remove_temporary_files()
        tensors, saved = self.out.open_resume_state()
        self.state, schedule = restore(self.parts, tensors, saved)
        total = planned_steps(self.settings, self.batches_per_epoch)
        self.schedule = schedule.replan(self.state.step, total)
        self.stats = StepStats(self.device, self.state)
        self.metrics.truncate(self.state.step, self.reporter)
        self.reporter.info(
            f"resuming at step {self.state.step} (epoch {self.state.epoch + 1}, "
            f"{self.state.best_description()})"
        )
        processes = saved.get("processes", 1)
        if processes != self.parallel.world_size:
            self.reporter.info(
                f"the run was saved by {processes} process(es) and goes on with "
                f"{self.parallel.world_size}: the same global batch and data order, each "
                "taking its share"
            )
        if self.schedule.total_steps != schedule.total_steps:
            self.reporter.info(
                f"the run now ends at step {total} (was {schedule.total_steps}): the learning "
                f"rate goes on from {self.schedule.factor(self.state.step):.3g} x the peak"
            )

    def save_weights(
        self, best: BestWeights | None = None, then: Callable[[], None] = lambda: None
    ) -> None:
        """Write the current weights as the model's (the best of evaluation `best`, if any),
        then call `then`: those the run trains (every weight, or the adapters of a LoRA run,
        which its output directory merges into the weights they adapt). Every process must
        call it: a sharded model is gathered."""
        tensors = self.writer.snapshot(self.parallel.gathered(trained_state(self.model)))
        out = self.out

        def write() -> None:
            out.write_weights(tensors, best)
            then()

        self.writer.submit(write)

    def save_best_weights(self) -> None:
        state, on_best = replace(self.state), self.on_best
        self.save_weights(BestWeights(state.best_step, state.best_loss), lambda: on_best(state))

    def save_unevaluated_weights(self) -> None:
        """A run interrupted before its first evaluation has no best weights: it keeps its
        current ones, so that chat, eval and info have a model to load."""
        self.save_weights()
        self.unevaluated_weights_step = self.state.step

    # -- logging --------------------------------------------------------------------------

    def raise_if_diverged(self, longest_nonfinite_in_row: int) -> None:
        """Stop the run once too many steps in a row had a non-finite loss or gradient."""
        limit = self.settings.max_nonfinite_in_row
        if longest_nonfinite_in_row < limit:
            return
        self.metrics.flush()
        self.writer.wait()  # the best weights being written are kept
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
        """Log the steps since the last log. On a GPU their statistics are copied to the
        host without waiting and written once they arrive (see `finish_log`): waiting would
        leave the GPU idle while the next step is prepared."""
        self.finish_log(task)
        state = self.state
        record = {"step": state.step, "epoch": state.epoch, "lr": lr}
        record["tokens_seen"] = state.tokens_seen
        self.pending_log = (self.stats.take_window(), record)

    def finish_log(self, task: Task, wait: bool = True) -> None:
        """Write the pending log record, if any (if `wait` is false, only once its
        statistics have arrived)."""
        if self.pending_log is None or not (wait or self.pending_log[0].ready()):
            return
        reading, record = self.pending_log
        self.pending_log = None
        mean_loss, tokens_per_second, nonfinite, _, longest = reading.result()
        self.metrics.record(
            kind="train",
            **record,
            loss=mean_loss,
            tokens_per_second=round(tokens_per_second, 1),
            nonfinite_steps=nonfinite,
            **peak_memory(self.device),
        )
        self.raise_if_diverged(longest)
        self.metrics.flush()
        task.update(
            loss=f"{mean_loss:.4f}",
            tok_s=f"{tokens_per_second:,.0f}",
            lr=f"{record['lr']:.2e}",
        )

    # -- evaluation -------------------------------------------------------------------

    def run_evaluation(self) -> None:
        state, settings = self.state, self.settings
        # On a CPU the evaluation's logits cannot reuse the blocks the training step freed
        # (see memory.release_free_memory): hand those pages back rather than hold both, at
        # the price of faulting them in again once per evaluation.
        if self.device.type == "cpu":
            release_free_memory()
        batches = self.parallel.rows(self.eval_data.eval_batches(settings.eval_batches))
        loss = self.parallel.mean(*loss_sums(self.step_model, batches, self.device, self.amp_dtype))
        improved = loss < state.best_loss
        if improved:
            state.best_loss, state.best_step = loss, state.step
            self.save_best_weights()
        if loss <= state.patience_reference - settings.min_improvement:
            state.patience_reference = loss
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        if state.evals_without_improvement >= settings.patience:
            if self.schedule.decays_early(state.step):
                planned = self.schedule.total_steps
                self.schedule = self.schedule.decay_now(state.step)
                state.evals_without_improvement = 0
                self.reporter.info(
                    f"no improvement of {settings.min_improvement} in {settings.patience} "
                    f"evaluations at the peak learning rate: its decay begins now and the run "
                    f"ends at step {self.schedule.total_steps} (was {planned})"
                )
            else:
                state.stopped_early = True
        self.metrics.record(
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
        self.stats.restart_clock()

    # -- the loop ---------------------------------------------------------------------

    def train_step(
        self, batch: Batch, lr_factor: float, received: int | None = None
    ) -> tuple[torch.Tensor, StepOutcome, HostCopy | None]:
        """One optimizer step at `lr_factor` times each group's peak learning rate, on this
        process's share of the global batch in `grad_accum` micro-batches. Returns the loss
        (the mean over the whole global batch), what the step did (device tensors: reading
        them waits for the step) and the stop flags the processes agreed on, given the
        signal this one `received` (see `Parallel.stop_signal`)."""
        self.optimizer_step.set_lr(lr_factor)
        micro_batches = list(
            zip(*(part.chunk(self.settings.grad_accum) for part in batch), strict=True)
        )
        targets = [micro_targets for _, micro_targets in micro_batches]
        shares, agreed = self.parallel.step_shares(targets, received, self.device)
        step_loss = None
        for index, (micro_batch, share) in enumerate(zip(micro_batches, shares, strict=True)):
            inputs, targets = to_device(micro_batch, self.device)
            last = index == len(micro_batches) - 1
            with self.parallel.gradient_sync(self.step_model, sync=last):
                with autocast(self.device, self.amp_dtype):
                    loss = self.step_model(inputs, targets, loss_chunk=self.loss_chunk)
                if share is not None:
                    loss = loss * share
                self.optimizer_step.scale_loss(loss).backward()
            loss = loss.detach()
            step_loss = loss if step_loss is None else step_loss + loss
        loss = self.parallel.step_loss(step_loss)
        return loss, self.optimizer_step(loss), agreed

    def compile_evaluation(self) -> None:
        """Run one validation batch, unrecorded, so that compiling the evaluation's own
        graph (no dropout, no gradients) is part of the start-up, like the step's, rather
        than a pause at the first evaluation."""
        batches = itertools.islice(self.eval_data.eval_batches(1), 1)
        loss_sums(self.step_model, self.parallel.rows(batches), self.device, self.amp_dtype)

    def save_due(self) -> bool:
        return time.monotonic() - self.last_save >= self.settings.save_interval_s

    def run(self) -> TrainState:
        """Train to the planned last step or an early stop (after `resume()`, from where
        the saved run stopped). SIGINT/SIGTERM save the resume state and raise Interrupted."""
        settings, state = self.settings, self.state
        self.model.train()
        task = self.reporter.start_task(
            "training", total=self.schedule.total_steps, completed=state.step
        )
        self.stats.restart_clock()

        def acknowledge(signum: int) -> None:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            task.announce(f"{name}: stopping after this step")

        with SignalCatcher(on_first=acknowledge) as signals:
            try:
                if state.step == 0:  # so that a run that dies before its first save resumes
                    self.save_resume_state()
                if settings.compile:
                    self.compile_evaluation()
                while not state.stopped_early and state.step < self.schedule.total_steps:
                    if state.batch_index >= self.batches_per_epoch:
                        state.epoch, state.batch_index = state.epoch + 1, 0
                    batch = self.train_data.get(state.epoch, state.batch_index)
                    lr_factor = self.schedule.factor(state.step)
                    loss, outcome, agreed = self.train_step(batch, lr_factor, signals.received)
                    tokens = batch[0].numel() * self.parallel.world_size
                    self.stats.add(loss, outcome.skipped, outcome.diverging, tokens)
                    state.step += 1
                    state.batch_index += 1
                    state.tokens_seen += tokens
                    task.update(completed=state.step)
                    epoch_done = state.batch_index >= self.batches_per_epoch
                    last = state.step >= self.schedule.total_steps
                    # Step 1 too, so that the first loss shows at once (a CPU step can take
                    # seconds).
                    first = state.step == 1
                    logged = state.step % settings.log_interval == 0 or first or epoch_done or last
                    if logged:
                        self.log(lr_factor * settings.lr, task)
                    else:
                        self.finish_log(task, wait=False)
                    evaluated = state.step % settings.eval_interval == 0 or epoch_done or last
                    if evaluated:
                        self.finish_log(task)
                        self.run_evaluation()
                        task.set_total(self.schedule.total_steps)
                    stop = self.parallel.stop_signal(agreed, signals.received)
                    if stop is not None:
                        self.finish_log(task)
                        if state.best_step == 0:
                            self.save_unevaluated_weights()
                        self.save_resume_state()
                        self.writer.wait()
                        # No process ends (and has torchrun end the rest) mid-write.
                        self.parallel.wait_for_all()
                        task.stop("interrupted")
                        raise Interrupted(stop, resume_step=state.step)
                    if (logged or evaluated) and self.parallel.any(self.save_due(), self.device):
                        self.finish_log(task)
                        self.save_resume_state()
                # The final state, so that a finished run can be extended (--resume with a
                # larger --max-steps or --max-epochs).
                self.finish_log(task)
                self.save_resume_state()
            finally:
                self.metrics.close()
                self.writer.close()
        task.finish()
        if state.stopped_early:
            self.reporter.info(
                f"early stop: no improvement of {settings.min_improvement} in "
                f"{settings.patience} evaluations"
            )
        return state

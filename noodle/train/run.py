"""What `noodle train` and `noodle finetune` share around the training loop: the output
directory's checks, model.json kept current with the run, and the closing steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from noodle.checkpoint import (
    METRICS,
    MODEL_JSON,
    RESUME,
    WEIGHTS,
    BestWeights,
    ModelDir,
    check_output_dir,
    load_model,
    model_metadata,
)
from noodle.config import ModelConfig
from noodle.device import select_device
from noodle.errors import Interrupted, NoodleError
from noodle.inference import Session, generate
from noodle.memory import release_free_memory
from noodle.parallel import Parallel
from noodle.progress import Reporter, plural
from noodle.sampling import SamplingSettings
from noodle.tokenizer import TextTokenizer
from noodle.train.lock import RunLock
from noodle.train.loop import Trainer
from noodle.train.resume import check_resumable
from noodle.train.settings import TrainSettings, TrainState

SAMPLE_TOKENS = 60


def holds_saved_run(path: Path) -> bool:
    """Whether OUTPUT_DIR holds anything a run saved (weights or a resume state): model.json
    alone is the start of a run that died before its first save, with nothing to lose."""
    return (path / WEIGHTS).exists() or (path / RESUME).exists()


def check_new_run(path: Path) -> None:
    if (path / MODEL_JSON).exists() and holds_saved_run(path):
        raise NoodleError(
            f"{path} already holds a model; continue its run with --resume or choose another "
            "output directory"
        )


def prepare_output_dir(path: Path, resume: bool, identity: dict) -> None:
    """Refuse a bad OUTPUT_DIR before any input is read; nothing is created or changed yet.

    A new run must not overwrite a model; a resumed run needs the resume state of a run
    with the same `identity` (see `resume.run_identity`) as far as it is known before the
    data is read; what it trains on is checked once read.
    """
    path = check_output_dir(path)
    if resume:
        if not path.is_dir():
            raise NoodleError(f"nothing to resume: {path} does not exist")
        check_resumable(ModelDir(path), identity)
    else:
        check_new_run(path)


@contextlib.contextmanager
def training_processes(
    settings: TrainSettings, backend: str | None
) -> Iterator[tuple[Parallel, torch.device]]:
    """The processes of this run (see `parallel`), connected for the `with`, and this
    process's device (`--backend`). How they share the global batch, and the optimizer,
    are checked before they meet."""
    parallel = Parallel.from_environment(settings.fsdp, settings.activation_checkpointing)
    parallel.check(settings.batch_size, settings.grad_accum, settings.optimizer)
    device = select_device(backend, parallel.local_rank)
    with parallel.processes(device) as connected:
        yield connected, device


@contextlib.contextmanager
def locked_output_dir(
    path: Path, resume: bool, reporter: Reporter, parallel: Parallel
) -> Iterator[ModelDir]:
    """OUTPUT_DIR, created once every process of the run got here (each having checked its
    inputs), with its run lock held (see `lock.RunLock`) for the `with`.

    What `prepare_output_dir` checked is checked again under the lock: another run may have
    finished there in the meantime. A new run takes over a directory where a run died
    before its first save. The processes other than the first, which holds the lock for
    them all, only open the directory.
    """
    parallel.wait_for_all()
    out = ModelDir(path)
    if not parallel.is_main:
        yield out
        return
    with RunLock(out.path):
        if not resume:
            check_new_run(out.path)
            if (out.path / MODEL_JSON).exists():
                reporter.info(
                    f"{out.path} holds a run that stopped before its first save: replaced"
                )
                out.file(METRICS).unlink(missing_ok=True)
        yield out


class RunRecord:
    """Writes OUTPUT_DIR/model.json: the architecture and tokenizer being trained and a
    training summary of the run so far, so the directory always says what it holds.

    The summary's best validation loss and step are those of the weights on disk (`best`),
    updated only once new best weights are written: a save that fails leaves model.json
    describing the previous ones, which are still there.
    """

    def __init__(
        self,
        out: ModelDir,
        config: ModelConfig,
        preset: str,
        tokenizer: TextTokenizer,
        kind: str,
        source: str,
        settings: TrainSettings,
        batches_per_epoch: int,
        extra: dict | None = None,
        writes: bool = True,
    ) -> None:
        self.out, self.config, self.preset, self.tokenizer = out, config, preset, tokenizer
        self.kind, self.source, self.settings = kind, source, settings
        self.batches_per_epoch = batches_per_epoch
        self.extra = extra or {}
        self.writes = writes  # only the first process of a run writes
        self.best = out.read_best_weights()

    def summary(self, state: TrainState, status: str, unevaluated_step: int | None) -> dict:
        """The training summary; `unevaluated_step` is the step of weights saved without an
        evaluation (on an interruption before the first one), if any."""
        if self.best:
            weights, weights_step = "best", self.best.step
        elif unevaluated_step is not None:
            weights, weights_step = "unevaluated", unevaluated_step
        else:
            weights, weights_step = None, None
        return {
            "kind": self.kind,
            "status": status,
            "steps": state.step,
            "epochs": state.epochs_done(self.batches_per_epoch),
            "tokens_seen": state.tokens_seen,
            "best_val_loss": self.best.val_loss if self.best else None,
            "best_step": self.best.step if self.best else 0,
            "weights": weights,
            "weights_step": weights_step,
            "source": self.source,
            "batch_size": self.settings.batch_size,
            "lr": self.settings.lr,
            "optimizer": self.settings.optimizer,
            "schedule": self.settings.schedule,
            "seed": self.settings.seed,
            **self.extra,
        }

    def write(self, state: TrainState, status: str, unevaluated_step: int | None = None) -> None:
        if not self.writes:
            return
        summary = self.summary(state, status, unevaluated_step)
        self.out.write_metadata(model_metadata(self.config, self.preset, self.tokenizer, summary))

    def on_best(self, state: TrainState) -> None:
        """For Trainer's `on_best`: the best weights of `state` are on disk."""
        self.best = BestWeights(state.best_step, state.best_loss)
        self.write(state, "training")


def run_training(
    trainer: Trainer, record: RunRecord, resume: bool, reporter: Reporter
) -> TrainState:
    """Run the loop with model.json saying whether the run is going, finished, interrupted
    or failed."""
    if resume:
        trainer.resume()
    else:
        record.write(trainer.state, "training")
    try:
        state = trainer.run()
    except (Interrupted, KeyboardInterrupt):
        record.write(trainer.state, "interrupted", trainer.unevaluated_weights_step)
        raise
    except Exception:
        # The failure may be the disk itself (full): it is the error to report.
        with contextlib.suppress(NoodleError):
            record.write(trainer.state, "failed")
        raise
    record.write(state, "finished")
    reporter.info(
        f"done: {plural(state.step, 'step')}, {state.tokens_seen:,} tokens, "
        f"{state.best_description()} -> {record.out.path}"
    )
    if record.writes:  # the others would race the first process for the file
        report_resume_state(record.out, trainer.settings.drop_resume_state, reporter)
    return state


def report_resume_state(out: ModelDir, drop: bool, reporter: Reporter) -> None:
    """Say what the resume state costs at the end of a run, or drop it (`drop`): chat and
    eval never need it, only extending the run with --resume does."""
    resume_mb = out.file(RESUME).stat().st_size / 1e6
    if drop:
        out.file(RESUME).unlink()
        reporter.info(f"dropped the resume state ({resume_mb:,.0f} MB): the run cannot be extended")
        return
    total_mb = sum(path.stat().st_size for path in out.path.iterdir() if path.is_file()) / 1e6
    reporter.info(
        f"{out.path} holds {total_mb:,.0f} MB, {resume_mb:,.0f} MB of it the resume state "
        f"({RESUME}), needed only to extend this run with --resume: delete it to keep the "
        "model alone (or train with --drop-resume-state)"
    )


def sample_from_best(directory: Path, device: torch.device, prompt: str, seed: int) -> str:
    """A short sampled continuation of `prompt` (without the prompt) by the best weights
    saved in `directory`, reproducible by seed.

    Callers drop their trainer first: the last weights and the optimizer's moments (three
    times the model) are done with, and their pages go back (see release_free_memory)
    before the best weights are loaded beside what remains.
    """
    release_free_memory()
    best = load_model(directory, device)
    session = Session(best.model, best.tokenizer)
    tokenizer = best.tokenizer
    generator = torch.Generator(device=session.device).manual_seed(seed)
    ids = list(generate(session, prompt, SAMPLE_TOKENS, SamplingSettings(), generator))
    return tokenizer.decode(ids)

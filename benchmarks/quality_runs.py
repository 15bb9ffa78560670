"""The runs of benchmarks/quality.py: one recipe trained for a budget of training time by
`noodle train`'s own Trainer, then scored by `noodle eval`'s code on held-out text.

Many runs share one process: a model architecture is one module, re-initialised for each
run and compiled once, so that torch.compile's graphs (one per dropout value and batch
size) and the CUDA graphs are built once. The time budget becomes a step count, from 30
real training steps timed on random tokens (after 15 untimed ones, which compile) before
the first run of each architecture, batch size and optimizer.

A run's training time counts its training steps only: it is measured from its first log
(step 1), without its evaluations and held-out checkpoints, and its first step is counted
at the run's own rate. At checkpoints, the held-out bits per byte is measured on
an evenly spread subset of the test text, outside the timed span, on the same clock.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality_corpora import split_paths
from noodle.batching import TokenWindows, split_windows
from noodle.checkpoint import ModelDir
from noodle.cli import resolved_settings, training_option_types
from noodle.config import ModelConfig, resolve_model_config
from noodle.corpus import load_token_stream
from noodle.device import select_device, select_dtype, synchronize
from noodle.errors import NoodleError
from noodle.evaluation import evaluate, evaluate_model, token_byte_lengths
from noodle.model import NoodleModel
from noodle.parallel import Parallel
from noodle.progress import Reporter
from noodle.tokenizer import load_tokenizer
from noodle.train.loop import Trainer
from noodle.train.pretrain import data_sized_config
from noodle.train.run import RunRecord, run_training
from noodle.train.settings import TrainSettings, run_defaults

CALIBRATION_WARMUP, CALIBRATION_STEPS = 15, 30
# Calibration trains a model that is thrown away; a small rate keeps its steps finite.
CALIBRATION_LR_FACTOR = 0.01


@dataclass(frozen=True)
class Run:
    """One training run: a row's recipe on one corpus with one seed."""

    row: str
    corpus: str
    seed: int
    model: str = "somen"
    dropout: float | None = None  # None: the dropout `noodle train` would choose
    time_fraction: float = 1.0  # of the time budget
    # `noodle train` options (snake_case) and other TrainSettings fields.
    options: dict = field(default_factory=dict)

    def settings(self, device_type: str) -> TrainSettings:
        """What `noodle train --model MODEL` runs with given these options on a device of
        this type: the others at the preset's defaults there (see PRESET_RUN_DEFAULTS), as
        the command line does."""
        defaults = run_defaults(self.model, device_type)
        options = set(training_option_types(defaults))
        given = {key: value for key, value in self.options.items() if key in options}
        extra = {key: value for key, value in self.options.items() if key not in options}
        settings = resolved_settings(defaults, {**given, "seed": self.seed})
        return replace(settings, **extra)


class CompileOnce(Parallel):
    """Hands every Trainer the same compiled module for the same model: compiling it again
    would trace it again."""

    compiled: dict[tuple[int, str | None], torch.nn.Module] = {}  # noqa: RUF012 (shared)

    def prepare_model(self, model: torch.nn.Module, compile_mode: str | None) -> torch.nn.Module:
        key = (id(model), compile_mode)
        if key not in self.compiled:
            self.compiled[key] = super().prepare_model(model, compile_mode)
        return self.compiled[key]


class TimedTrainer(Trainer):
    """`noodle train`'s Trainer, timing its training steps apart from its evaluations and
    measuring the held-out text at the checkpoint steps (outside the timed span)."""

    def __init__(
        self,
        *args: object,
        probe: Callable[[torch.nn.Module], float],
        checkpoints: list[int],
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.probe, self.checkpoints = probe, checkpoints
        self.first_log: tuple[int, float] | None = None  # (step, clock)
        self.last_log = (0, 0.0)  # (step, timed seconds)
        self.excluded = 0.0  # seconds of evaluations and probes since the first log
        self.curve: list[tuple[int, float, float]] = []  # (step, timed seconds, bits/byte)

    def clock(self) -> float:
        """Now, once the device has done the steps queued so far: they count as training,
        not as what follows (the loop's logging no longer waits for the device)."""
        synchronize(self.device)
        return time.perf_counter()

    def timed(self, now: float) -> float:
        return 0.0 if self.first_log is None else now - self.first_log[1] - self.excluded

    def measure(self, now: float) -> None:
        self.curve.append((self.state.step, self.timed(now), self.probe(self.step_model)))

    def log(self, lr: float, task: object) -> None:
        super().log(lr, task)
        now = self.clock()
        if self.first_log is None:
            self.first_log = (self.state.step, now)
        self.last_log = (self.state.step, self.timed(now))
        if self.checkpoints and self.state.step >= self.checkpoints[0]:
            while self.checkpoints and self.state.step >= self.checkpoints[0]:
                self.checkpoints.pop(0)
            self.measure(now)
            self.excluded += time.perf_counter() - now

    def run_evaluation(self) -> None:
        started = self.clock()
        super().run_evaluation()
        # A WSD run that plateaus ends sooner than planned, at its new last step.
        ended = self.state.stopped_early or self.state.step >= self.schedule.total_steps
        if ended and (not self.curve or self.curve[-1][0] != self.state.step):
            self.measure(started)  # the curve ends where the run does
        if self.first_log is not None:
            self.excluded += time.perf_counter() - started

    def seconds_per_step(self) -> float | None:
        """The rate of the timed span (from the first log to the last)."""
        if self.first_log is None or self.last_log[0] <= self.first_log[0]:
            return None
        return self.last_log[1] / (self.last_log[0] - self.first_log[0])


@dataclass
class CorpusData:
    name: str
    train_tokens: np.ndarray
    test_path: Path
    test_tokens: np.ndarray


@dataclass(frozen=True)
class BenchOptions:
    time_budget: float  # training seconds of a run (times its time_fraction)
    steps: int | None  # a fixed step count instead
    eval_subset: int  # test windows measured at a checkpoint
    checkpoints: int  # checkpoints a run
    score_batch: int  # batch size of the final scoring
    work: Path  # the prepared corpora (see quality_corpora)
    tokenizer: str | None
    device: str
    dtype: str
    compile: str  # auto, on or off


class Bench:
    """What the runs of one process share: device, tokenizer, models and step timings."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.device = select_device(options.device)
        self.amp_dtype = select_dtype(options.dtype, self.device)
        auto = self.device.type == "cuda"
        self.compile = auto if options.compile == "auto" else options.compile == "on"
        # A shape seen a second time is compiled for itself, never made dynamic: a
        # dynamic dimension would carry over to the graphs compiled for later runs.
        torch._dynamo.config.automatic_dynamic_shapes = False
        self.tokenizer = load_tokenizer(options.tokenizer)
        self.byte_lengths = token_byte_lengths(self.tokenizer)
        self.quiet = Reporter(interactive=False, quiet=True)
        self.models: dict[ModelConfig, NoodleModel] = {}
        self.step_seconds: dict[tuple, float] = {}
        self.scratch = Path(tempfile.mkdtemp(prefix="noodle-quality-", dir=scratch_root()))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def load(self, name: str) -> CorpusData:
        train, test = split_paths(self.options.work, name)
        train_tokens = load_token_stream(str(train), self.tokenizer, self.quiet)
        test_tokens = load_token_stream(str(test), self.tokenizer, self.quiet)
        return CorpusData(name, train_tokens, test, test_tokens)

    def fresh_model(self, config: ModelConfig, seed: int) -> NoodleModel:
        """The architecture's one module, holding the weights `noodle train` starts from
        with this seed (and the random state it then has)."""
        torch.manual_seed(seed)
        initial = NoodleModel(config)
        model = self.models.get(config)
        if model is None:
            model = self.models[config] = initial.to(self.device)
        else:
            model.load_state_dict(initial.state_dict())
        return model

    def trainer(
        self,
        model: NoodleModel,
        train: TokenWindows,
        validation: TokenWindows,
        settings: TrainSettings,
        out: ModelDir,
        cls: type[Trainer] = Trainer,
        **extra: object,
    ) -> Trainer:
        return cls(
            model,
            train,
            validation,
            settings,
            out,
            self.device,
            self.amp_dtype,
            self.quiet,
            identity={},
            parallel=CompileOnce(),
            **extra,
        )

    def step_time(self, config: ModelConfig, settings: TrainSettings) -> float:
        """Seconds per training step of this architecture, batch size and optimizer, on
        random tokens (so that it needs no corpus and can compile while they are read)."""
        key = (config, settings.batch_size, settings.optimizer)
        if key not in self.step_seconds:
            steps, batch = CALIBRATION_WARMUP + CALIBRATION_STEPS, settings.batch_size
            random = np.random.default_rng(0).integers(
                0, self.tokenizer.vocab_size, steps * batch * config.ctx_len + 1
            )
            data = TokenWindows(random.astype(np.int64), config.ctx_len, batch)
            model = self.fresh_model(config, settings.seed)
            trainer = self.trainer(model, data, data, settings, ModelDir(self.scratch / "timing"))
            for index in range(steps):
                if index == CALIBRATION_WARMUP:
                    synchronize(self.device)
                    started = time.perf_counter()
                batch = trainer.train_data.get(0, index)
                loss, outcome, _ = trainer.train_step(batch, CALIBRATION_LR_FACTOR)
                trainer.stats.add(loss, outcome.skipped, outcome.diverging, batch[0].numel())
            synchronize(self.device)
            self.step_seconds[key] = (time.perf_counter() - started) / CALIBRATION_STEPS
        return self.step_seconds[key]

    def probe(
        self, data: CorpusData, ctx_len: int, batch_size: int
    ) -> Callable[[torch.nn.Module], float]:
        """A model's bits per byte on evenly spread test windows, in whole batches (the
        compiled evaluation's shape), as `noodle eval` counts them."""
        windows = TokenWindows(data.test_tokens, ctx_len, batch_size)
        count = min(self.options.eval_subset, windows.count) // batch_size * batch_size
        if count == 0:
            raise NoodleError(f"{data.test_path}: too small for one batch of {batch_size} windows")
        chosen = np.linspace(0, windows.count - 1, num=count).round().astype(np.int64)
        batches = np.split(chosen, count // batch_size)
        _, targets = windows.windows(chosen)
        text_bytes = int(self.byte_lengths[targets.numpy()].sum())

        def bits_per_byte(model: torch.nn.Module) -> float:
            subset = (windows.windows(batch) for batch in batches)
            loss = evaluate(model, subset, self.device, self.amp_dtype)
            return loss / math.log(2) * targets.numel() / text_bytes

        return bits_per_byte

    def run(self, run: Run, corpus: Callable[[], CorpusData]) -> dict:
        """Train `run` for its budget, then score its best weights. `corpus()` gives the
        data, waiting for it if need be: the step timing (and so the compiling) comes
        first where the dropout is known without the data."""
        started = time.perf_counter()
        preset, config = resolve_model_config(run.model, self.tokenizer.vocab_size)
        if run.dropout is None:
            tokens = len(corpus().train_tokens)
            config = data_sized_config(preset, config, tokens, self.device.type)
        else:
            config = replace(config, dropout=run.dropout)
        settings = replace(
            run.settings(self.device.type),
            compile=self.compile,
            max_epochs=10**9,
            save_interval_s=math.inf,
        )
        step_s = None if self.options.steps else self.step_time(config, settings)
        steps = self.options.steps or max(
            1, int(self.options.time_budget * run.time_fraction / step_s)
        )
        data = corpus()
        train, validation = split_windows(
            data.train_tokens, config.ctx_len, settings.batch_size, run.seed
        )
        if "eval_batches" not in run.options:
            settings = replace(settings, eval_batches=whole_batches(settings, validation))
        settings = replace(settings, max_steps=steps)
        out = ModelDir(self.scratch / "run")
        record = RunRecord(
            out,
            config,
            preset,
            self.tokenizer,
            "train",
            data.name,
            settings,
            train.batches_per_epoch(),
        )
        count = self.options.checkpoints
        checkpoints = sorted({max(1, round(steps * k / count)) for k in range(1, count + 1)})
        trainer = self.trainer(
            self.fresh_model(config, run.seed),
            train,
            validation,
            settings,
            out,
            TimedTrainer,
            on_best=record.on_best,
            probe=self.probe(data, config.ctx_len, settings.batch_size),
            checkpoints=checkpoints,
        )
        out.write_tokenizer(self.tokenizer)
        result = describe(run, settings, config, trainer.schedule.warmup_steps, step_s)
        try:
            state = run_training(trainer, record, resume=False, reporter=self.quiet)
        except NoodleError as exc:  # e.g. diverged: reported, and the other runs go on
            result["error"] = str(exc)
            state = trainer.state
        # The untimed first steps count at the run's own rate.
        rate = trainer.seconds_per_step() or step_s or 0.0
        lead = (trainer.first_log[0] if trainer.first_log else 0) * rate
        train_s = trainer.last_log[1] + lead
        result.update(
            steps=state.step,
            stopped_early=state.stopped_early,
            train_s=round(train_s, 2),
            tokens=state.tokens_seen,
            tokens_per_s=round(state.tokens_seen / train_s) if train_s > 0 else None,
            excluded_s=round(trainer.excluded, 2),
            best_val_loss=round(state.best_loss, 4) if state.best_step else None,
            best_step=state.best_step,
            curve=[[step, round(s + lead, 2), round(bpb, 4)] for step, s, bpb in trainer.curve],
        )
        del trainer
        if state.best_step and "error" not in result:
            score = evaluate_model(
                str(out.path),
                str(data.test_path),
                self.options.score_batch,
                self.quiet,
                self.device.type,
                self.options.dtype,
            )
            result.update(
                heldout_loss=round(score.loss, 4), heldout_bpb=round(score.bits_per_byte, 4)
            )
        shutil.rmtree(out.path)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return result


SCRATCH_NEEDED = 4 << 30  # bytes: a few model directories of the larger presets


def scratch_root() -> str | None:
    """Memory-backed storage where there is room (containers often give /dev/shm 64 MB):
    the runs' files are written, fsynced and dropped. Else the default temporary folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > SCRATCH_NEEDED:
        return str(shm)
    return None


def whole_batches(settings: TrainSettings, validation: TokenWindows) -> int:
    """The default evaluation size cut to whole batches: a last, smaller batch would make
    torch.compile compile the evaluation once more for its shape (compile time only, which
    `noodle train` pays too, but device time here)."""
    return max(1, min(settings.eval_batches, validation.count // settings.batch_size))


def describe(
    run: Run, settings: TrainSettings, config: ModelConfig, warmup: int, step_s: float | None
) -> dict:
    """A run's recipe, as its result records it."""
    return {
        "row": run.row,
        "corpus": run.corpus,
        "seed": run.seed,
        "model": run.model,
        "optimizer": settings.optimizer,
        "schedule": settings.schedule,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "dropout": config.dropout,
        "warmup_steps": warmup,
        "decay_fraction": settings.decay_fraction,
        "weight_decay": settings.weight_decay,
        "options": run.options,
        "dropout_given": run.dropout,
        "batch_size_given": run.options.get("batch_size"),
        "planned_steps": settings.max_steps,
        "timed_step_ms": None if step_s is None else round(1000 * step_s, 3),
    }

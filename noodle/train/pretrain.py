"""`noodle train`: a model trained from scratch on a corpus, into a model directory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from noodle.batching import split_windows
from noodle.checkpoint import TOKENIZER, ModelDir
from noodle.config import ModelConfig, resolve_model_config
from noodle.corpus import load_token_stream, read_lines, token_chunks
from noodle.device import describe_device, select_dtype
from noodle.errors import UsageError
from noodle.parallel import Parallel
from noodle.progress import Reporter
from noodle.tokenizer import TextTokenizer, learn_tokenizer, learned_vocabulary, load_tokenizer
from noodle.train.loop import Trainer
from noodle.train.resume import run_identity, saved_dropout
from noodle.train.run import (
    RunRecord,
    locked_output_dir,
    prepare_output_dir,
    run_training,
    sample_from_best,
    training_processes,
)
from noodle.train.settings import PRESET_RUN_DEFAULTS, TrainSettings, TrainState, run_defaults

SAMPLE_PROMPT = "Once upon a time"
FINGERPRINT_CHUNK = 1 << 24  # tokens hashed at a time
LINES_PER_UPDATE = 4096  # of the progress of learning a tokenizer


@dataclass
class TrainOptions:
    corpus: str
    output_dir: Path
    model: str = "somen"
    tokenizer: str | None = None
    backend: str | None = None
    dtype: str = "auto"
    resume: bool = False
    use_cache: bool = True
    compile: bool | None = None  # None: compile on CUDA, not elsewhere
    settings: TrainSettings = field(default_factory=TrainSettings)


def corpus_fingerprint(tokens: np.ndarray) -> str:
    """A hash of the whole token stream, so resuming on a corpus changed anywhere is refused
    (about a second per GB of tokens)."""
    digest = hashlib.sha256()
    for chunk in token_chunks(tokens, FINGERPRINT_CHUNK):
        digest.update(np.ascontiguousarray(chunk))
    return digest.hexdigest()[:32]


def run_tokenizer(options: TrainOptions, vocabulary: int, reporter: Reporter) -> TextTokenizer:
    """The tokenizer `--tokenizer bpe:N` stands for: learned from the corpus, or when
    resuming, the one the run learned (kept in OUTPUT_DIR)."""
    if options.resume:
        return load_tokenizer(Path(options.output_dir) / TOKENIZER)
    task = reporter.start_task("learning the tokenizer", total=None, unit="bytes")

    def lines() -> Iterator[str]:
        read = 0
        for count, line in enumerate(read_lines(options.corpus, reporter), 1):
            read += len(line.encode("utf-8"))
            if count % LINES_PER_UPDATE == 0:
                task.update(read)
            yield line
        task.update(read)

    tokenizer = learn_tokenizer(lines(), vocabulary)
    task.finish(vocabulary=tokenizer.vocab_size)
    return tokenizer


def data_sized_config(
    preset: str, config: ModelConfig, corpus_tokens: int, device_type: str
) -> ModelConfig:
    """A preset's architecture with the dropout its defaults on this type of device give for
    a corpus of this many tokens (see `RunDefaults.dropout`); a CONFIG.json's keeps its own."""
    if preset not in PRESET_RUN_DEFAULTS:
        return config
    defaults = run_defaults(preset, device_type)
    dropout = defaults.dropout(corpus_tokens, config.parameter_count(), config.dropout)
    return replace(config, dropout=dropout)


def vocabulary_to_learn(options: TrainOptions) -> int | None:
    """N of `--tokenizer bpe:N` (None for a tokenizer given whole), refused out of range or
    with the corpus on standard input, which it would read twice."""
    to_learn = learned_vocabulary(options.tokenizer)
    if to_learn is not None and options.corpus == "-":
        raise UsageError(
            f"--tokenizer {options.tokenizer} reads the corpus twice (to learn the tokenizer, "
            "then to tokenize it): give a file or URL, not standard input"
        )
    return to_learn


def train(options: TrainOptions, reporter: Reporter) -> TrainState:
    to_learn = vocabulary_to_learn(options)  # before the processes meet: a usage error
    with training_processes(options.settings, options.backend) as (parallel, device):
        return train_with(options, to_learn, parallel, device, reporter)


def train_with(
    options: TrainOptions,
    to_learn: int | None,
    parallel: Parallel,
    device: torch.device,
    reporter: Reporter,
) -> TrainState:
    """`train` in its processes; `to_learn` is `vocabulary_to_learn(options)`."""
    amp_dtype = select_dtype(options.dtype, device)
    compile_model = device.type == "cuda" if options.compile is None else options.compile
    settings = replace(options.settings, compile=compile_model)
    tokenizer = load_tokenizer(options.tokenizer) if to_learn is None else None
    vocabulary = to_learn if tokenizer is None else tokenizer.vocab_size
    preset, config = resolve_model_config(options.model, vocabulary)
    name = f"model {preset}" if preset != "custom" else f"model {options.model}"
    parallel = parallel.fit_memory(config, name, settings, amp_dtype, device, reporter)
    # A preset's dropout may depend on the corpus: it is checked once the corpus is read.
    known = {"architecture": {k: v for k, v in config.to_dict().items() if k != "dropout"}}
    if tokenizer is not None:
        known["tokenizer"] = tokenizer.sha256
    prepare_output_dir(options.output_dir, options.resume, run_identity(settings, **known))
    if tokenizer is None:
        tokenizer = run_tokenizer(options, to_learn, reporter)
    with parallel.main_first():  # one process per machine fills the token cache
        tokens = load_token_stream(options.corpus, tokenizer, reporter, options.use_cache)
    if options.resume and preset in PRESET_RUN_DEFAULTS:
        # On another type of device the preset's defaults may give the same corpus (its hash
        # is checked) another dropout, and no option sets it: the run keeps its own.
        config = replace(config, dropout=saved_dropout(ModelDir(options.output_dir)))
    else:
        config = data_sized_config(preset, config, len(tokens), device.type)
    identity = run_identity(settings, architecture=config.to_dict(), tokenizer=tokenizer.sha256)
    train_windows, val_windows = split_windows(
        tokens, config.ctx_len, settings.batch_size, settings.seed
    )
    compile_mode = settings.compile_mode if settings.compile else None
    model = parallel.build_model(config, device, settings.seed, amp_dtype, compile_mode)
    reporter.info(
        f"model {preset}: {model.parameter_count():,} parameters | device "
        f"{describe_device(device)}{parallel.description()} | precision "
        f"{str(amp_dtype).removeprefix('torch.')} | corpus {len(tokens):,} tokens "
        f"({train_windows.count:,} training / {val_windows.count:,} validation windows of "
        f"{config.ctx_len})"
    )
    with locked_output_dir(options.output_dir, options.resume, reporter, parallel) as out:
        record = RunRecord(
            out,
            config,
            preset,
            tokenizer,
            "train",
            options.corpus,
            settings,
            train_windows.batches_per_epoch(),
            writes=parallel.is_main,
        )
        trainer = Trainer(
            model,
            train_windows,
            val_windows,
            settings,
            out,
            device,
            amp_dtype,
            reporter,
            {**identity, "corpus": corpus_fingerprint(tokens)},
            on_best=record.on_best,
            parallel=parallel,
        )
        if not options.resume and parallel.is_main:
            out.write_tokenizer(tokenizer)
        state = run_training(trainer, record, options.resume, reporter)
    del trainer, model  # see sample_from_best
    if parallel.samples:
        sample = sample_from_best(out.path, device, SAMPLE_PROMPT, settings.seed)
        print(SAMPLE_PROMPT + sample, flush=True)
    return state

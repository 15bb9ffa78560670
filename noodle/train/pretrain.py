"""`noodle train`: a model trained from scratch on a corpus, into a model directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from noodle.batching import split_windows
from noodle.config import resolve_model_config
from noodle.corpus import load_token_stream, token_chunks
from noodle.device import select_device, select_dtype
from noodle.parallel import Parallel
from noodle.progress import Reporter
from noodle.tokenizer import load_tokenizer
from noodle.train.loop import Trainer
from noodle.train.resume import run_identity
from noodle.train.run import (
    RunRecord,
    locked_output_dir,
    prepare_output_dir,
    run_training,
    sample_from_best,
)
from noodle.train.settings import TrainSettings, TrainState

SAMPLE_PROMPT = "Once upon a time"
FINGERPRINT_CHUNK = 1 << 24  # tokens hashed at a time


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


def train(options: TrainOptions, reporter: Reporter) -> TrainState:
    settings = options.settings
    parallel = Parallel.from_environment(settings.fsdp, settings.activation_checkpointing)
    parallel.check(settings.batch_size, settings.grad_accum, settings.optimizer)
    device = select_device(options.backend, parallel.local_rank)
    with parallel.processes(device) as connected:
        return train_with(options, connected, device, reporter)


def train_with(
    options: TrainOptions, parallel: Parallel, device: torch.device, reporter: Reporter
) -> TrainState:
    amp_dtype = select_dtype(options.dtype, device)
    compile_model = device.type == "cuda" if options.compile is None else options.compile
    settings = replace(options.settings, compile=compile_model)
    tokenizer = load_tokenizer(options.tokenizer)
    preset, config = resolve_model_config(options.model, tokenizer.vocab_size)
    name = f"model {preset}" if preset != "custom" else f"model {options.model}"
    micro_batch = settings.batch_size // parallel.batch_parts(settings.grad_accum)
    parallel = parallel.shard_if_needed(
        config, micro_batch, settings.optimizer, amp_dtype, device, reporter
    )
    parallel.require_memory(config, name, micro_batch, settings.grad_accum, amp_dtype, device)
    identity = run_identity(settings, architecture=config.to_dict(), tokenizer=tokenizer.sha256)
    prepare_output_dir(options.output_dir, options.resume, identity)
    with parallel.main_first():  # one process per machine fills the token cache
        tokens = load_token_stream(options.corpus, tokenizer, reporter, options.use_cache)
    train_windows, val_windows = split_windows(
        tokens, config.ctx_len, settings.batch_size, settings.seed
    )
    compile_mode = settings.compile_mode if settings.compile else None
    model = parallel.build_model(config, device, settings.seed, amp_dtype, compile_mode)
    reporter.info(
        f"model {preset}: {model.parameter_count():,} parameters | device {device}"
        f"{parallel.description()} | precision {str(amp_dtype).removeprefix('torch.')} | "
        f"corpus {len(tokens):,} tokens ({train_windows.count:,} training / "
        f"{val_windows.count:,} validation windows of {config.ctx_len})"
    )
    # Only now, with every input checked (by every process), is OUTPUT_DIR created or
    # written to.
    parallel.wait_for_all()
    with locked_output_dir(
        options.output_dir, options.resume, reporter, lock=parallel.is_main
    ) as out:
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

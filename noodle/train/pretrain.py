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
from noodle.footprint import require_training_memory
from noodle.model import NoodleModel
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
    parallel = Parallel.from_environment()
    device = select_device(options.backend, parallel.local_rank)
    amp_dtype = select_dtype(options.dtype, device)
    compile_model = device.type == "cuda" if options.compile is None else options.compile
    settings = replace(options.settings, compile=compile_model)
    tokenizer = load_tokenizer(options.tokenizer)
    preset, config = resolve_model_config(options.model, tokenizer.vocab_size)
    name = f"model {preset}" if preset != "custom" else f"model {options.model}"
    require_training_memory(config, name, settings.batch_size, amp_dtype, device)
    identity = run_identity(settings, architecture=config.to_dict(), tokenizer=tokenizer.sha256)
    prepare_output_dir(options.output_dir, options.resume, identity)
    tokens = load_token_stream(options.corpus, tokenizer, reporter, options.use_cache)
    train_windows, val_windows = split_windows(
        tokens, config.ctx_len, settings.batch_size, settings.seed
    )
    torch.manual_seed(settings.seed)
    model = NoodleModel(config).to(device)
    reporter.info(
        f"model {preset}: {model.parameter_count():,} parameters | device {device} | "
        f"precision {str(amp_dtype).removeprefix('torch.')} | corpus {len(tokens):,} tokens "
        f"({train_windows.count:,} training / {val_windows.count:,} validation windows of "
        f"{config.ctx_len})"
    )
    # Only now, with every input checked, is OUTPUT_DIR created or written to.
    with locked_output_dir(options.output_dir, options.resume, reporter) as out:
        record = RunRecord(
            out,
            config,
            preset,
            tokenizer,
            "train",
            options.corpus,
            settings,
            train_windows.batches_per_epoch(),
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
        if not options.resume:
            out.write_tokenizer(tokenizer)
        state = run_training(trainer, record, options.resume, reporter)
    del trainer, model  # see sample_from_best
    sample = sample_from_best(out.path, device, SAMPLE_PROMPT, settings.seed)
    print(SAMPLE_PROMPT + sample, flush=True)
    return state

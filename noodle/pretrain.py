"""`noodle train`: a model trained from scratch on a corpus, into a model directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from noodle.batching import split_windows
from noodle.checkpoint import MODEL_JSON, ModelDir, check_output_dir, load_model, model_metadata
from noodle.config import resolve_model_config
from noodle.corpus import load_token_stream
from noodle.device import select_device, select_dtype
from noodle.errors import Interrupted, NoodleError
from noodle.inference import Session, generate
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.sampling import SamplingSettings
from noodle.tokenizer import load_tokenizer
from noodle.training import (
    Trainer,
    TrainSettings,
    TrainState,
    check_resumable,
    settings_fingerprint,
)

SAMPLE_PROMPT = "Once upon a time"
SAMPLE_TOKENS = 60
FINGERPRINT_CHUNK = 1 << 24  # tokens hashed at a time


def default_lr(batch_size: int) -> float:
    """The original's rule: 1e-4 at batch 4, scaled linearly with the batch size."""
    return 1e-4 * batch_size / 4


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
    settings: TrainSettings = field(default_factory=TrainSettings)


def corpus_fingerprint(tokens: np.ndarray) -> str:
    """A hash of the whole token stream, so resuming on a corpus changed anywhere is refused
    (about a second per GB of tokens)."""
    digest = hashlib.sha256()
    for start in range(0, len(tokens), FINGERPRINT_CHUNK):
        digest.update(np.ascontiguousarray(tokens[start : start + FINGERPRINT_CHUNK]))
    return digest.hexdigest()[:32]


def closing_sample(model: NoodleModel, tokenizer, seed: int) -> str:
    session = Session(model, tokenizer)
    generator = torch.Generator(device=session.device).manual_seed(seed)
    ids = list(generate(session, SAMPLE_PROMPT, SAMPLE_TOKENS, SamplingSettings(), generator))
    return SAMPLE_PROMPT + tokenizer.decode(ids)


def prepare_output_dir(options: TrainOptions, identity: dict) -> None:
    """Refuse a bad OUTPUT_DIR before the corpus is read; nothing is created or changed yet.

    A new run must not overwrite a model; a resumed run needs the resume state of a run
    with the same architecture, tokenizer and settings (the corpus is checked once read).
    """
    path = check_output_dir(options.output_dir)
    if options.resume:
        if not path.is_dir():
            raise NoodleError(f"nothing to resume: {path} does not exist")
        out = ModelDir(path)
        check_resumable(out, {**identity, "settings": settings_fingerprint(options.settings)})
    elif (path / MODEL_JSON).exists():
        raise NoodleError(
            f"{path} already holds a model; continue its run with --resume or choose another "
            "output directory"
        )


def train(options: TrainOptions, reporter: Reporter) -> TrainState:
    settings = options.settings
    device = select_device(options.backend)
    amp_dtype = select_dtype(options.dtype, device)
    tokenizer = load_tokenizer(options.tokenizer)
    preset, config = resolve_model_config(options.model, tokenizer.vocab_size)
    identity = {"architecture": config.to_dict(), "tokenizer": tokenizer.sha256}
    prepare_output_dir(options, identity)
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
    out = ModelDir(options.output_dir)

    def summary(state: TrainState, status: str) -> dict:
        return {
            "kind": "train",
            "status": status,
            "steps": state.step,
            "epochs": state.epoch,
            "tokens_seen": state.tokens_seen,
            "best_val_loss": None if state.best_step == 0 else state.best_loss,
            "best_step": state.best_step,
            "source": options.corpus,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "seed": settings.seed,
        }

    def write_metadata(state: TrainState, status: str) -> None:
        out.write_metadata(model_metadata(config, preset, tokenizer, summary(state, status)))

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
        on_best=lambda state: write_metadata(state, "training"),
    )
    if options.resume:
        trainer.resume()
    else:
        write_metadata(trainer.state, "training")
        out.write_tokenizer(tokenizer)
    try:
        state = trainer.run()
    except Interrupted:
        write_metadata(trainer.state, "interrupted")
        raise
    except Exception:
        write_metadata(trainer.state, "failed")
        raise
    write_metadata(state, "finished")
    reporter.info(
        f"done: {state.step} steps, {state.tokens_seen:,} tokens, best validation loss "
        f"{state.best_loss:.4f} at step {state.best_step} -> {out.path}"
    )
    best = load_model(out.path, device)
    print(closing_sample(best.model, best.tokenizer, settings.seed), flush=True)
    return state

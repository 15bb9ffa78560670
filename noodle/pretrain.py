"""`noodle train`: a model trained from scratch on a corpus, into a model directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from noodle.batching import split_windows
from noodle.checkpoint import MODEL_JSON, ModelDir, load_model, model_metadata
from noodle.config import config_from_dict, read_json_file, resolve_model_config
from noodle.corpus import load_token_stream
from noodle.device import select_device, select_dtype
from noodle.errors import NoodleError
from noodle.inference import Session, generate
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.sampling import SamplingSettings
from noodle.tokenizer import load_tokenizer
from noodle.training import Interrupted, Trainer, TrainSettings, TrainState

SAMPLE_PROMPT = "Once upon a time"
SAMPLE_TOKENS = 60


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
    compile: bool | None = None  # None: compile on CUDA, not elsewhere
    settings: TrainSettings = field(default_factory=TrainSettings)


def corpus_fingerprint(tokens: np.ndarray) -> str:
    """Identifies a token stream cheaply: its length and its first and last tokens."""
    digest = hashlib.sha256(str(len(tokens)).encode())
    digest.update(np.ascontiguousarray(tokens[:65536]).tobytes())
    digest.update(np.ascontiguousarray(tokens[-65536:]).tobytes())
    return digest.hexdigest()[:16]


def closing_sample(model: NoodleModel, tokenizer, seed: int) -> str:
    session = Session(model, tokenizer)
    generator = torch.Generator(device=session.device).manual_seed(seed)
    ids = list(generate(session, SAMPLE_PROMPT, SAMPLE_TOKENS, SamplingSettings(), generator))
    return SAMPLE_PROMPT + tokenizer.decode(ids)


def train(options: TrainOptions, reporter: Reporter) -> TrainState:
    device = select_device(options.backend)
    amp_dtype = select_dtype(options.dtype, device)
    compile_model = device.type == "cuda" if options.compile is None else options.compile
    settings = replace(options.settings, compile=compile_model)
    out = ModelDir(options.output_dir)
    existing = out.file(MODEL_JSON)
    if options.resume:
        metadata = read_json_file(existing) if existing.exists() else None
        if metadata is None:
            raise NoodleError(f"nothing to resume: {existing} does not exist")
        tokenizer = load_tokenizer(out.file("tokenizer.json"))
        config, _ = config_from_dict(metadata, str(existing))
        preset = metadata.get("preset", "custom")
    else:
        if existing.exists():
            raise NoodleError(
                f"{options.output_dir} already holds a model; continue it with --resume or "
                "choose another output directory"
            )
        tokenizer = load_tokenizer(options.tokenizer)
        preset, config = resolve_model_config(options.model, tokenizer.vocab_size)

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

    if not options.resume:
        write_metadata(TrainState(), "tokenizing")
        out.write_tokenizer(tokenizer)
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
    fingerprint = {
        "architecture": config.to_dict(),
        "corpus": corpus_fingerprint(tokens),
        "batch_size": settings.batch_size,
        "seed": settings.seed,
    }
    trainer = Trainer(
        model,
        train_windows,
        val_windows,
        settings,
        out,
        device,
        amp_dtype,
        reporter,
        fingerprint,
        on_best=lambda state: write_metadata(state, "training"),
    )
    if not options.resume:
        write_metadata(trainer.state, "training")
    try:
        state = trainer.run(resume=options.resume)
    except (Interrupted, KeyboardInterrupt):
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

"""`noodle finetune`: a trained model further trained on instruction data, into a new
model directory: every weight, or through LoRA adapters on its frozen weights (see
noodle.lora)."""

from __future__ import annotations

import functools
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from noodle.checkpoint import (
    ADAPTERS,
    WEIGHTS,
    ModelFiles,
    SavedTensors,
    open_model_dir,
    weights_sha256,
)
from noodle.config import LoraSettings
from noodle.device import describe_device, select_dtype
from noodle.errors import NoodleError
from noodle.instructions import (
    RESPONSE_HEADER,
    examples_fingerprint,
    load_examples,
    split_examples,
)
from noodle.lora import AdaptedModelDir, adapter_parameter_count, add_adapters, initial_adapters
from noodle.model import NoodleModel
from noodle.parallel import Parallel
from noodle.progress import Reporter
from noodle.train.loop import Trainer
from noodle.train.resume import run_identity
from noodle.train.run import (
    RunRecord,
    locked_output_dir,
    prepare_output_dir,
    run_training,
    sample_from_best,
    training_processes,
)
from noodle.train.settings import TrainSettings, TrainState


@dataclass
class FinetuneOptions:
    model: str
    input: str
    output_dir: Path
    settings: TrainSettings
    backend: str | None = None
    dtype: str = "auto"
    resume: bool = False
    lora: LoraSettings | None = None  # None: every weight is trained


def adapters_identity(lora: LoraSettings | None, base: ModelFiles) -> dict:
    """What the adapters add to a run's identity: their settings (None for a run that
    trains every weight, so that resuming either kind as the other is refused) and, for a
    LoRA run, the base weights' hash: its resume state holds the adapters alone and the
    base is read again from its directory, where other weights would not fit them."""
    if lora is None:
        return {"lora": None}
    return {"lora": lora.to_dict(), "base_weights": weights_sha256(base)}


def model_to_finetune(
    parallel: Parallel,
    base: ModelFiles,
    lora: LoraSettings | None,
    settings: TrainSettings,
    amp_dtype: torch.dtype,
    device: torch.device,
) -> NoodleModel:
    """The base model, ready for `parallel` to train: every weight, or its frozen weights
    with LoRA adapters at their starting values (see `lora.add_adapters`)."""
    compile_mode = settings.compile_mode if settings.compile else None
    weights: Mapping[str, torch.Tensor] = SavedTensors(
        base.directory / WEIGHTS, "unreadable weights"
    )
    adapt = None
    if lora is not None:
        # FSDP shards the frozen weights in float32 and gathers them in the compute dtype.
        frozen_dtype = torch.float32 if parallel.fsdp else amp_dtype
        adapt = functools.partial(add_adapters, settings=lora, frozen_dtype=frozen_dtype)
        weights = ChainMap(initial_adapters(base.config, lora, settings.seed), weights)
    return parallel.build_model(
        base.config, device, settings.seed, amp_dtype, compile_mode, weights, adapt
    )


def finetune(options: FinetuneOptions, reporter: Reporter) -> TrainState:
    with training_processes(options.settings, options.backend) as (parallel, device):
        return finetune_with(options, parallel, device, reporter)


def finetune_with(
    options: FinetuneOptions, parallel: Parallel, device: torch.device, reporter: Reporter
) -> TrainState:
    settings, lora = options.settings, options.lora
    amp_dtype = select_dtype(options.dtype, device)
    base = open_model_dir(options.model)
    tokenizer, config = base.tokenizer, base.config
    name = f"model {base.directory}"
    parallel = parallel.fit_memory(config, name, settings, amp_dtype, device, reporter, lora)
    if Path(options.output_dir).resolve() == base.directory.resolve():
        raise NoodleError(
            f"{options.output_dir} is the base model's directory; fine-tune into another one"
        )
    identity = run_identity(
        settings,
        architecture=config.to_dict(),
        base_model=str(base.directory.resolve()),
        **adapters_identity(lora, base),
    )
    prepare_output_dir(options.output_dir, options.resume, identity)

    examples, skipped = load_examples(options.input, tokenizer, config.ctx_len, reporter)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
    train_data, val_data = split_examples(
        examples, settings.batch_size, pad_id, settings.seed, options.input
    )
    model = model_to_finetune(parallel, base, lora, settings, amp_dtype, device)
    trained, adapters = config.parameter_count(), None
    if lora is not None:
        trained = adapter_parameter_count(config, lora)
        adapters = {
            **lora.to_dict(),
            "file": ADAPTERS,
            "trained_parameters": trained,
            "base_weights_sha256": identity["base_weights"],
        }

    with locked_output_dir(options.output_dir, options.resume, reporter, parallel) as out:
        if lora is not None:
            out = AdaptedModelDir(out.path, lora, base.directory / WEIGHTS)
        record = RunRecord(
            out,
            config,
            base.metadata.get("preset", "custom"),
            tokenizer,
            "finetune",
            options.input,
            settings,
            train_data.batches_per_epoch(),
            extra={
                "base_model": str(base.directory.resolve()),
                "base_training": base.metadata.get("training"),
                "examples": len(examples),
                "skipped_blocks": skipped,
                "lora": adapters,
            },
            writes=parallel.is_main,
        )
        if not options.resume and parallel.is_main:
            out.write_tokenizer(tokenizer)
        through = f" (LoRA {lora.description()}: {trained:,} trained)" if lora else ""
        reporter.info(
            f"fine-tuning {base.directory}: {config.parameter_count():,} parameters{through} | "
            f"device {describe_device(device)}{parallel.description()} | "
            f"precision {str(amp_dtype).removeprefix('torch.')} | "
            f"{len(examples):,} examples ({len(train_data.examples):,} training / "
            f"{len(val_data.examples):,} validation)"
        )
        fingerprint = {**identity, "examples": examples_fingerprint(examples)}
        torch.manual_seed(settings.seed)
        parallel.seed_streams(settings.seed)
        trainer = Trainer(
            model,
            train_data,
            val_data,
            settings,
            out,
            device,
            amp_dtype,
            reporter,
            fingerprint,
            on_best=record.on_best,
            parallel=parallel,
        )
        state = run_training(trainer, record, options.resume, reporter)

    del trainer, model  # see sample_from_best
    if parallel.samples:
        first = val_data.examples[0]
        prompt = tokenizer.decode(first.tokens[: first.prompt_len].tolist())
        reporter.info(
            f"sample reply to the validation prompt {prompt.removesuffix(RESPONSE_HEADER)!r}:"
        )
        print(sample_from_best(out.path, device, prompt, settings.seed), flush=True)
    return state

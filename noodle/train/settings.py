"""What a training run is asked to do (TrainSettings) and where it stands (TrainState).

Plain data, importing no torch, so that the command line can build settings (and show
`--help`) without loading PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class RunDefaults:
    """The defaults of the options `noodle train` and `noodle finetune` share. Without
    --lr, the peak learning rate is the original's rule: `lr_at_batch_4` scaled linearly
    with the batch size. Without --eval-batches, an evaluation reads `eval_windows`
    sequences (examples) in batches of the training batch size, whatever that is: the
    original's 50 batches of 8 (500 of 4 for fine-tuning). A larger batch makes steps
    larger, not the validation sample (at batch 64, 50 batches would cost a tenth of the
    run's time). `on_cuda`, where given, replaces them all on a CUDA GPU: a recipe
    measured there (see `for_device`)."""

    max_epochs: int
    batch_size: int
    lr_at_batch_4: float
    eval_interval: int
    eval_windows: int
    patience: int
    min_improvement: float
    max_steps: int | None = None
    # Training from scratch, a preset's dropout by the corpus's tokens per parameter:
    # (tokens per parameter, dropout) pairs in increasing order, the last pair whose ratio
    # the corpus reaches applies (more text than the model can memorise needs less of it).
    # None keeps the dropout of the preset's architecture.
    dropout_by_data: tuple[tuple[float, float], ...] | None = None
    schedule: str = "cosine"
    optimizer: str = "adamw"
    on_cuda: RunDefaults | None = None

    def for_device(self, device_type: str) -> RunDefaults:
        """The defaults on a device of this type (`torch.device.type`: cuda, mps, cpu)."""
        return self.on_cuda if device_type == "cuda" and self.on_cuda else self

    def dropout(self, corpus_tokens: int, parameters: int, architecture: float) -> float:
        """The dropout for a corpus of this many tokens and a model of this many parameters,
        whose architecture names `architecture`."""
        ratio = corpus_tokens / parameters
        reached = [dropout for least, dropout in self.dropout_by_data or () if ratio >= least]
        return reached[-1] if reached else architecture


PRETRAIN_DEFAULTS = RunDefaults(
    max_epochs=20,
    batch_size=8,
    lr_at_batch_4=1e-4,
    eval_interval=200,
    eval_windows=400,
    patience=10,
    min_improvement=0.01,
)
# somen's recipe on a CUDA GPU, the best of benchmarks/QUALITY.md's sweeps (H200, equal
# training time): a batch that fills the GPU, a higher peak rate, scaled with the batch size
# like the original's rule, warm-up-stable-decay, and Muon for the blocks' matrices (2.7%
# fewer held-out bits per byte than the tuned AdamW + cosine in 2 minutes on Gutenberg, 3.3%
# on TinyStories). It ran without dropout on Gutenberg (0.98 tokens per parameter) and with
# the architecture's 0.1 on TinyStories (0.03). Nothing was measured on a CPU or MPS, where
# batch 64 is too slow: there somen keeps the general defaults.
SOMEN_ON_CUDA = replace(
    PRETRAIN_DEFAULTS,
    batch_size=64,
    lr_at_batch_4=3e-3 / 16,  # 3e-3 at batch 64
    schedule="wsd",
    optimizer="muon",
    dropout_by_data=((0.5, 0.0),),
)
# Each preset's defaults (configs as data); the options given on the command line still
# win, and a CONFIG.json model gets PRETRAIN_DEFAULTS. soba and udon keep the general ones
# on every device: the sweeps measured somen only, and a rate of 3e-3 is not safe for
# models 20 to 1,000 times its size.
PRESET_RUN_DEFAULTS = {
    "somen": replace(PRETRAIN_DEFAULTS, on_cuda=SOMEN_ON_CUDA),
    "soba": PRETRAIN_DEFAULTS,
    "udon": PRETRAIN_DEFAULTS,
    # About ten minutes on two CPU cores (benchmarks/RESULTS.md), whatever the corpus.
    "harusame": RunDefaults(
        max_epochs=20,
        max_steps=1000,
        batch_size=16,
        lr_at_batch_4=5e-4,
        eval_interval=100,
        eval_windows=320,  # 20 batches of 16
        patience=10,
        min_improvement=0.01,
    ),
}


def run_defaults(model: str, device_type: str, sharded: bool = False) -> RunDefaults:
    """The defaults of `noodle train --model MODEL` on a device of this type: the preset's,
    or for a CONFIG.json the general ones. A `sharded` (FSDP) run keeps AdamW: Muon
    orthogonalises whole matrices, and FSDP gives each process a slice of each."""
    defaults = PRESET_RUN_DEFAULTS.get(model, PRETRAIN_DEFAULTS).for_device(device_type)
    return replace(defaults, optimizer="adamw") if sharded else defaults


FINETUNE_DEFAULTS = RunDefaults(
    max_epochs=5,
    batch_size=4,
    lr_at_batch_4=2e-5,
    eval_interval=5000,
    eval_windows=2000,
    patience=3,
    min_improvement=0.005,
)
# Adapters start from no change at all (B is zero) and are a few percent of the weights: they
# take a learning rate ten times full fine-tuning's, as LoRA runs commonly do.
LORA_FINETUNE_DEFAULTS = replace(FINETUNE_DEFAULTS, lr_at_batch_4=2e-4)


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
    optimizer: str = "adamw"
    schedule: str = "cosine"
    # The fraction of the run that warm-up-stable-decay spends decaying.
    decay_fraction: float = 0.2
    log_interval: int = 10
    # The resume state is saved at most this often (and on a signal and at the end): a
    # crash loses at most this much work. 0 saves after every step that evaluated.
    save_interval_s: float = 600.0
    max_nonfinite_in_row: int = 5
    # The global batch is split into this many micro-batches whose gradients add up to one
    # step: a batch larger than memory allows, with the same result.
    grad_accum: int = 1
    # Shard parameters, gradients and optimizer state over the processes (FSDP), and
    # recompute each block's activations in the backward pass instead of keeping them.
    fsdp: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    # Delete the resume state when the run finishes (it cannot be extended then).
    drop_resume_state: bool = False
    # Also write the metrics as TensorBoard event files into this directory.
    tensorboard_dir: str | None = None
    # CUDA graphs replay each step's ~200 kernels with one launch: small models are bound by
    # kernel-launch overhead otherwise (somen at batch 8 spends most of its step on the CPU).
    compile_mode: str = "reduce-overhead"
    # The training loss fused with the output layer: computed with its gradients in the
    # forward pass, this many positions at a time, keeping no logits for the backward pass
    # (noodle.loss); 0 makes all the logits and uses F.cross_entropy. The same arithmetic
    # either way. None: loss.FUSED_CHUNK when the model is compiled, else 0 (uncompiled,
    # the fused form's separate passes cost more than they save).
    loss_chunk: int | None = None


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
    nonfinite_steps: int = 0
    nonfinite_in_row: int = 0
    stopped_early: bool = False

    def best_description(self) -> str:
        if self.best_step == 0:
            return "no evaluation yet"
        return f"best validation loss {self.best_loss:.4f} at step {self.best_step:,}"

    def epochs_done(self, batches_per_epoch: int) -> float:
        """Passes over the training data so far, e.g. 2.0 after two whole epochs (`epoch`
        is the index of the one in progress, counted from 0)."""
        return round(self.epoch + self.batch_index / max(batches_per_epoch, 1), 3)


# The settings that decide which weights a run ends with: resuming with any of them changed
# would silently give another run, so it is refused. The run's length (max epochs/steps)
# may change, to continue a finished run further; logging and saving settings may change too.
# Each maps to the option that sets it, or None for those noodle sets itself.
SETTING_OPTIONS = {
    "batch_size": "--batch-size",
    "lr": "--lr",
    "eval_interval": "--eval-interval",
    "eval_batches": "--eval-batches",
    "patience": "--patience",
    "min_improvement": "--min-improvement",
    "seed": "--seed",
    "weight_decay": None,
    "grad_clip": None,
    "warmup_steps": None,
    "optimizer": "--optimizer",
    "schedule": "--schedule",
    "decay_fraction": None,
}


def settings_fingerprint(settings: TrainSettings) -> dict:
    return {name: getattr(settings, name) for name in SETTING_OPTIONS}


def planned_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    total = settings.max_epochs * batches_per_epoch
    return min(total, settings.max_steps) if settings.max_steps else total

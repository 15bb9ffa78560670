"""The `noodle` command line: parses options and hands over to the modules that do the work."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import operator
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.exceptions import TyperException

from noodle import __version__
from noodle.config import DEFAULT_PRESET, LORA_TARGETS, PRESET_TOKENIZERS, LoraSettings
from noodle.errors import Interrupted, NoodleError, UsageError, did_you_mean
from noodle.progress import Reporter
from noodle.train.settings import (
    FINETUNE_DEFAULTS,
    LORA_FINETUNE_DEFAULTS,
    OPTIMIZERS,
    PRESET_RUN_DEFAULTS,
    SCHEDULES,
    RunDefaults,
    TrainSettings,
    run_defaults,
)


class HelpFlag:
    """--help shown without the `<bool>` value typer's help would give it."""

    def get_help_option(self, ctx: typer.Context) -> object:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class InterruptibleGroup(HelpFlag, TyperGroup):
    """Hands a Ctrl-C in a command on as Interrupted: typer would turn the KeyboardInterrupt
    into a silent exit 130."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted(signal.SIGINT) from None


class NoodleCommand(HelpFlag, TyperCommand):
    """A command whose usage line names its arguments as its help does: `CORPUS OUTPUT_DIR`
    where typer writes `{corpus} {output_dir}`."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.display_name_raw
                pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    name="noodle",
    cls=InterruptibleGroup,
    help="Noodle: a small language model you train yourself.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(name: str | None = None) -> Callable[[Callable], Callable]:
    return app.command(name=name, cls=NoodleCommand)


def flag(*declarations: str, help: str, **extra: object) -> typer.models.OptionInfo:
    """An on/off option (typer's help would give it a `<bool>` value it does not take)."""
    return typer.Option(*declarations, help=help, metavar="", **extra)


Backend = Annotated[
    str | None,
    typer.Option(
        help="Compute backend: auto, cpu, cuda or mps. Default: $NOODLE_BACKEND, else auto "
        "(cuda, then mps, then cpu).",
        show_default=False,
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        help="Precision: auto (bfloat16 autocast on GPUs that support it, float32 on CPU), "
        "float32, bfloat16 or float16."
    ),
]
InferenceDtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Precision: auto (bfloat16 on GPUs that support it; on x86 CPUs float16 weights "
        "with float32 arithmetic), float32, bfloat16 or float16.",
    ),
]
Corpus = Annotated[
    str,
    typer.Argument(
        metavar="CORPUS",
        help="Text corpus: a local file, - for standard input, an http(s):// URL or "
        "hf://owner/repo/path/to/file (a file of a Hugging Face dataset; HF_TOKEN is sent "
        "when set). Streamed, never read whole.",
        show_default=False,
    ),
]
ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="Model directory (or the model.json / model.safetensors inside it).",
        show_default=False,
    ),
]
OutputDir = Annotated[
    Path,
    typer.Argument(
        metavar="OUTPUT_DIR", help="Directory to write the model into.", show_default=False
    ),
]
Resume = Annotated[
    bool,
    flag(
        "--resume",
        help="Continue the interrupted run in OUTPUT_DIR exactly where it stopped (give the "
        "same inputs and options; only --max-epochs/--max-steps may change).",
    ),
]


def positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"--{name} must be positive, got {value}")


def finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise UsageError(f"--{name} must be a finite number, got {value}")


def one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(
            f"unknown --{name} {value!r}{did_you_mean(value, choices)} "
            f"(choose {', '.join(choices)})"
        )


def default_text(
    defaults: RunDefaults, preset: str | None, show: Callable[[RunDefaults], object]
) -> str:
    """`Default: X.`, and where the defaults on a CUDA GPU differ, what they are there:
    `Default: 8 (64 for somen on a GPU).`"""
    here, on_gpu = show(defaults), show(defaults.for_device("cuda"))
    if here == on_gpu:
        return f"Default: {here}."
    return f"Default: {here} ({on_gpu} for {preset} on a GPU)."


def lr_rule(defaults: RunDefaults) -> str:
    """The peak learning rate's rule, at the defaults' batch size: `0.003 × batch-size / 64`."""
    batch = defaults.batch_size
    return f"{defaults.lr_at_batch_4 * batch / 4:g} × batch-size / {batch}"


def training_option_types(
    defaults: RunDefaults, preset: str | None = None
) -> dict[str, tuple[object, object]]:
    """The options `train` and `finetune` share: name -> (annotation, default). Their help
    shows `defaults` (those of `preset`, if they differ on a GPU)."""

    def recipe_option(kind: type, description: str, field: str) -> tuple[object, object]:
        """An option whose default is the field `field` of the defaults."""
        text = f"{description} " + default_text(defaults, preset, operator.attrgetter(field))
        annotation = Annotated[kind, typer.Option(help=text, show_default=False)]
        return annotation, getattr(defaults, field)

    return {
        "max_epochs": (
            Annotated[int, typer.Option(help="Passes over the training split.")],
            defaults.max_epochs,
        ),
        "max_steps": (
            Annotated[
                int | None, typer.Option(help="Stop after this many steps, whatever the epochs.")
            ],
            defaults.max_steps,
        ),
        "batch_size": recipe_option(int, "Sequences per optimizer step.", "batch_size"),
        "lr": (
            Annotated[
                float | None,
                typer.Option(
                    help="Peak learning rate (by default proportional to --batch-size). "
                    + default_text(defaults, preset, lr_rule),
                    show_default=False,
                ),
            ],
            None,
        ),
        "optimizer": recipe_option(
            str, "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest).", "optimizer"
        ),
        "schedule": recipe_option(
            str,
            "Learning rate after the warm-up: cosine (decay to a tenth of the peak) or wsd "
            "(flat, then a linear decay over the last fifth).",
            "schedule",
        ),
        "grad_accum": (
            Annotated[
                int,
                typer.Option(
                    help="Split each batch into this many micro-batches whose gradients add "
                    "up to one step: a batch larger than memory, with the same result."
                ),
            ],
            TrainSettings.grad_accum,
        ),
        "fsdp": (
            Annotated[
                bool,
                flag(
                    "--fsdp",
                    help="Shard parameters, gradients and optimizer state over the torchrun "
                    "processes (FSDP2); on by itself where the model and its optimizer state "
                    "would crowd one GPU.",
                ),
            ],
            False,
        ),
        "activation_checkpointing": (
            Annotated[
                bool,
                flag(
                    "--activation-checkpointing",
                    help="Recompute each block's activations in the backward pass instead of "
                    "keeping them: less memory, about a third more compute.",
                ),
            ],
            False,
        ),
        "eval_interval": (
            Annotated[int, typer.Option(help="Evaluate every this many steps.")],
            defaults.eval_interval,
        ),
        "eval_batches": (
            Annotated[
                int | None,
                typer.Option(
                    help="Validation batches per evaluation (evenly spread over the "
                    f"validation set). Default: {defaults.eval_windows} sequences' worth.",
                    show_default=False,
                ),
            ],
            None,
        ),
        "patience": (
            Annotated[
                int,
                typer.Option(
                    help="Stop after this many evaluations without an improvement of "
                    "--min-improvement."
                ),
            ],
            defaults.patience,
        ),
        "min_improvement": (
            Annotated[
                float,
                typer.Option(help="The drop in validation loss that counts as an improvement."),
            ],
            defaults.min_improvement,
        ),
        "save_every": (
            Annotated[
                float,
                typer.Option(
                    help="Save the resume state at least every this many minutes (also on "
                    "Ctrl-C, SIGTERM and at the end): what a crash can lose."
                ),
            ],
            TrainSettings.save_interval_s / 60,
        ),
        "seed": (
            Annotated[int, typer.Option(help="Seed for weights, data order and dropout.")],
            TrainSettings.seed,
        ),
        "drop_resume_state": (
            Annotated[
                bool,
                flag(
                    "--drop-resume-state",
                    help="Delete the resume state (three times the model's size: the "
                    "latest weights and the optimizer's moments) when the run finishes: the "
                    "directory keeps what chat and eval need, and the run can no longer be "
                    "extended with --resume.",
                ),
            ],
            False,
        ),
        "tensorboard_dir": (
            Annotated[
                str | None,
                typer.Option(
                    "--tensorboard",
                    metavar="DIR",
                    help="Also write the metrics as TensorBoard event files into DIR "
                    "(needs pip install 'noodle\\[tensorboard]').",
                    show_default=False,
                ),
            ],
            None,
        ),
    }


def training_settings(defaults: RunDefaults, values: dict) -> TrainSettings:
    """TrainSettings from the shared options' values; a minimum improvement of 0 (any drop
    counts) is allowed, the other numbers must be positive, and every float finite. Without
    --lr, the original's rule: `lr_at_batch_4` scaled linearly with the batch size."""
    for name, value in values.items():
        if isinstance(value, float):
            finite(name.replace("_", "-"), value)
    min_improvement, save_every = values.pop("min_improvement"), values.pop("save_every")
    drop_resume_state = values.pop("drop_resume_state")
    for name, value in values.items():
        if not isinstance(value, str | bool):
            positive(name.replace("_", "-"), value)
    if min_improvement < 0:
        raise UsageError(f"--min-improvement must not be negative, got {min_improvement}")
    if save_every < 0:
        raise UsageError(f"--save-every must not be negative, got {save_every}")
    one_of("optimizer", values["optimizer"], OPTIMIZERS)
    one_of("schedule", values["schedule"], SCHEDULES)
    if values["lr"] is None:
        values["lr"] = defaults.lr_at_batch_4 * values["batch_size"] / 4
    if values["eval_batches"] is None:
        values["eval_batches"] = -(-defaults.eval_windows // values["batch_size"])
    if values["tensorboard_dir"] is not None:
        from noodle.train.tensorboard_sink import check_tensorboard

        check_tensorboard(values["tensorboard_dir"])
    return TrainSettings(
        min_improvement=min_improvement,
        save_interval_s=60 * save_every,
        drop_resume_state=drop_resume_state,
        **values,
    )


def resolved_settings(defaults: RunDefaults, given: dict) -> TrainSettings:
    """TrainSettings from the shared options `given` on the command line (name -> value)
    and `defaults` for the others."""
    values = {name: default for name, (_, default) in training_option_types(defaults).items()}
    return training_settings(defaults, {**values, **given})


def with_training_options(
    defaults: RunDefaults,
    choose: Callable[[dict], RunDefaults] | None = None,
    preset: str | None = None,
) -> Callable[[Callable], Callable]:
    """Give a command the options `train` and `finetune` share (with `defaults`, or those
    `choose` gives for the values of the command's options, e.g. a preset's, for the
    options not given; the help shows `defaults`, those of `preset`); the command receives
    them as one TrainSettings, its `settings` parameter. With --resume, the options not
    given are the saved run's."""
    options = training_option_types(defaults, preset)

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True).parameters
        parameters = [p for name, p in own.items() if name != "settings"]
        parameters.append(
            inspect.Parameter("context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        )
        parameters += [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind
            )
            for name, (kind, default) in options.items()
        ]

        @functools.wraps(command)
        def run(context: typer.Context, **values: object) -> None:
            shared = {name: values.pop(name) for name in options}
            given = {
                name: value
                for name, value in shared.items()
                if context.get_parameter_source(name).name != "DEFAULT"
            }
            if values.get("resume"):  # the saved run's options, unless given again
                from noodle.train.resume import saved_options

                saved = saved_options(values["output_dir"]).items()
                given = {**{name: v for name, v in saved if name in options}, **given}
            chosen = defaults if choose is None else choose({**values, **shared})
            command(settings=resolved_settings(chosen, given), **values)

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate


def later_process() -> bool:
    """Whether this is a process of a torchrun run other than the first (RANK > 0): the
    first one reports for all of them."""
    return os.environ.get("RANK", "0") != "0"


def machines_first_process() -> bool:
    """Whether this process is the first of its machine (LOCAL_RANK 0; a lone process is)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def run_with_reporter(work: Callable[[Reporter], object]) -> None:
    reporter = Reporter(silent=later_process())
    try:
        work(reporter)
    finally:
        reporter.close()


def pretrain_defaults(values: dict) -> RunDefaults:
    """The defaults of `train --model` on the device `--backend` gives (somen's differ on a
    CUDA GPU), and with --fsdp: the one place the command line looks for a device, so it
    imports torch."""
    from noodle.device import device_type

    return run_defaults(values["model"], device_type(values["backend"]), values["fsdp"])


@command()
@with_training_options(PRESET_RUN_DEFAULTS[DEFAULT_PRESET], pretrain_defaults, DEFAULT_PRESET)
def train(
    corpus: Corpus,
    output_dir: OutputDir,
    settings: TrainSettings,
    model: Annotated[
        str,
        typer.Option(
            help="Preset (somen, soba, udon; harusame: a first model in minutes on a CPU, with "
            "its own defaults: --tokenizer bpe:4096 --max-steps 1000 --batch-size 16 --lr 2e-3 "
            "--eval-interval 100 --eval-batches 20) or a CONFIG.json in model.json form."
        ),
    ] = DEFAULT_PRESET,
    resume: Resume = False,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="gpt-neox (the bundled GPT-NeoX-20B tokenizer), a tokenizer.json, or bpe:N to "
            "learn an N-token byte-level BPE from the corpus first (a small vocabulary makes a "
            "small model several times faster; the corpus is read twice, so not from "
            "standard input). Default: the preset's, else gpt-neox.",
            show_default=False,
        ),
    ] = None,
    cache: Annotated[
        bool,
        flag(
            "--cache/--no-cache",
            help="Keep the tokenized corpus in $XDG_CACHE_HOME/noodle (default ~/.cache/noodle) "
            "so the next run on the same corpus starts at once.",
        ),
    ] = True,
    compile: Annotated[
        bool | None,
        flag(
            "--compile/--no-compile",
            help="torch.compile the model. Default: on for CUDA, off elsewhere.",
            show_default=False,
        ),
    ] = None,
    backend: Backend = None,
    dtype: Dtype = "auto",
) -> None:
    """Train a model from scratch on CORPUS into OUTPUT_DIR."""
    from noodle.train.pretrain import TrainOptions
    from noodle.train.pretrain import train as run_train

    options = TrainOptions(
        corpus=corpus,
        output_dir=output_dir,
        model=model,
        tokenizer=tokenizer or PRESET_TOKENIZERS.get(model),
        backend=backend,
        dtype=dtype,
        resume=resume,
        use_cache=cache,
        compile=compile,
        settings=settings,
    )
    run_with_reporter(lambda reporter: run_train(options, reporter))


def lora_settings(
    rank: int | None, alpha: float | None, targets: str | None, optimizer: str
) -> LoraSettings | None:
    """The adapters --lora-rank, --lora-alpha and --lora-targets ask for; None without
    --lora-rank (every weight is trained)."""
    if rank is None:
        for name, value in (("alpha", alpha), ("targets", targets)):
            if value is not None:
                raise UsageError(f"--lora-{name} needs --lora-rank (LoRA adapters' rank)")
        return None
    positive("lora-rank", rank)
    alpha = 2.0 * rank if alpha is None else alpha
    finite("lora-alpha", alpha)
    positive("lora-alpha", alpha)
    chosen = LORA_TARGETS if targets is None else targets.split(",")
    for target in chosen:
        one_of("lora-targets", target.strip(), LORA_TARGETS)
    if optimizer == "muon":
        raise UsageError(
            "--optimizer muon orthogonalises the blocks' whole matrices, which LoRA freezes; "
            "train adapters with --optimizer adamw"
        )
    stripped = {target.strip() for target in chosen}
    return LoraSettings(rank, alpha, tuple(t for t in LORA_TARGETS if t in stripped))


@command()
@with_training_options(
    FINETUNE_DEFAULTS,
    lambda values: FINETUNE_DEFAULTS if values["lora_rank"] is None else LORA_FINETUNE_DEFAULTS,
)
def finetune(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="Base model directory (or the model.json / model.safetensors inside it).",
            show_default=False,
        ),
    ],
    input: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="Instruction file: ### Instruction: / ### Input: / ### Response: blocks "
            "separated by <|endoftext|> (see `noodle prepare-instructions`).",
            show_default=False,
        ),
    ],
    output_dir: OutputDir,
    settings: TrainSettings,
    lora_rank: Annotated[
        int | None,
        typer.Option(
            help="Train low-rank adapters (LoRA) of this rank on the frozen base weights "
            "instead of every weight: a fraction of the memory. OUTPUT_DIR gets the merged "
            "weights, and the adapters alone beside them. Default --lr with it: "
            f"{LORA_FINETUNE_DEFAULTS.lr_at_batch_4:g} × batch-size / 4.",
            show_default=False,
        ),
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option(
            help="The adapters' updates are scaled by alpha / rank. Default: twice the rank.",
            show_default=False,
        ),
    ] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            help="The layers of each block that get adapters, comma-separated: qkv (attention "
            "queries, keys and values), proj (attention output), up and down (MLP). "
            "Default: all four.",
            show_default=False,
        ),
    ] = None,
    resume: Resume = False,
    backend: Backend = None,
    dtype: Dtype = "auto",
) -> None:
    """Fine-tune MODEL on the instruction file INPUT into OUTPUT_DIR."""
    from noodle.train.finetune import FinetuneOptions
    from noodle.train.finetune import finetune as run_finetune

    lora = lora_settings(lora_rank, lora_alpha, lora_targets, settings.optimizer)
    options = FinetuneOptions(
        model=model,
        input=input,
        output_dir=output_dir,
        backend=backend,
        dtype=dtype,
        resume=resume,
        settings=settings,
        lora=lora,
    )
    run_with_reporter(lambda reporter: run_finetune(options, reporter))


@command(name="prepare-instructions")
def prepare_instructions(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="IN",
            help="JSON array or JSON Lines of records with instruction, input or context, "
            "and output or response (Alpaca and Dolly field names).",
            show_default=False,
        ),
    ],
    destination: Annotated[
        Path,
        typer.Argument(metavar="OUT", help="Instruction file to write.", show_default=False),
    ],
    force: Annotated[bool, flag("--force", help="Overwrite OUT if it already exists.")] = False,
) -> None:
    """Turn a JSON/JSONL instruction set into an instruction file for `noodle finetune`."""
    from noodle.instructions import prepare_instructions as prepare

    run_with_reporter(lambda reporter: prepare(source, destination, reporter, force))


@command(name="eval")
def evaluate(
    model: ModelArg,
    corpus: Corpus,
    json_output: Annotated[
        bool, flag("--json", help="Print one JSON object instead of a table.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Context windows per batch.")] = 8,
    cache: Annotated[
        bool, flag("--cache/--no-cache", help="Keep the tokenized corpus in the cache.")
    ] = True,
    backend: Backend = None,
    dtype: Dtype = "auto",
) -> None:
    """Measure MODEL's loss, perplexity and bits per byte on all of CORPUS."""
    from noodle.evaluation import evaluate_model

    positive("batch-size", batch_size)

    def work(reporter: Reporter) -> None:
        result = evaluate_model(model, corpus, batch_size, reporter, backend, dtype, cache)
        print(json.dumps(result.to_json()) if json_output else result.to_text(), flush=True)

    run_with_reporter(work)


@command()
def info(model: ModelArg) -> None:
    """Show MODEL's architecture, parameter count, tokenizer and training summary."""
    from rich.console import Console

    from noodle.info import model_table

    Console(highlight=False).print(model_table(model))


@command()
def chat(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="Model directory, or the model.json / model.safetensors in it.",
            show_default=False,
        ),
    ],
    prompt: Annotated[
        str | None, typer.Option(help="Answer this once and exit.", show_default=False)
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature; 0 or less always takes the likeliest.")
    ] = 0.7,
    top_k: Annotated[
        int, typer.Option(help="Sample from the k likeliest tokens only (0: no limit).")
    ] = 40,
    top_p: Annotated[
        float,
        typer.Option(help="Sample from the fewest tokens whose probability reaches p (1: all)."),
    ] = 0.95,
    repetition_penalty: Annotated[
        float,
        typer.Option(help="Make tokens already in the context less likely (1: off)."),
    ] = 1.1,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 100,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed for reproducible sampling. Default: a fresh one every run.",
            show_default=False,
        ),
    ] = None,
    compile_decode: Annotated[
        bool | None,
        flag(
            "--compile/--no-compile",
            help="Compile the decode step with torch.compile. Default: on CUDA only.",
            show_default=False,
        ),
    ] = None,
    backend: Backend = None,
    dtype: InferenceDtype = "auto",
) -> None:
    """Talk with MODEL: on a terminal, one turn per line through a pipe, or once (--prompt)."""
    from noodle.chat import ChatOptions
    from noodle.chat import chat as run_chat
    from noodle.sampling import SamplingSettings

    positive("max-tokens", max_tokens)
    settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
    options = ChatOptions(
        model=model,
        prompt=prompt,
        settings=settings,
        max_tokens=max_tokens,
        seed=seed,
        backend=backend,
        dtype=dtype,
        compile_decode=compile_decode,
    )
    run_chat(options)


@command()
def export(
    model: ModelArg,
    out_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUT_DIR",
            help="Directory to write the transformers model into: new, or empty.",
            show_default=False,
        ),
    ],
) -> None:
    """Write MODEL as a Hugging Face transformers model directory (modelling code, weights,
    tokenizer and model card): load it with trust_remote_code=True."""
    from noodle.export import export_model

    run_with_reporter(lambda reporter: export_model(model, out_dir, reporter))


@command()
def plot(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL...",
            help="Model directories of the runs to draw (their metrics.jsonl), one or more.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Image to write; its suffix picks the format (.png, .svg, .pdf)."
        ),
    ] = Path("curves.png"),
    size: Annotated[str, typer.Option(help="Image size in pixels, WIDTHxHEIGHT.")] = "1200x800",
) -> None:
    """Draw the training and validation loss (and learning rate) of one or more runs against
    tokens seen, the best checkpoint of each marked. Needs matplotlib (noodle\\[plot])."""
    from noodle.plot import parse_size, plot_runs

    plot_runs(models, output, parse_size(size))


def version_callback(value: bool) -> None:
    if value:
        print(f"noodle {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        flag("--version", callback=version_callback, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Noodle: a small language model you train yourself."""


def fail(message: str, code: int, every_process: bool = False) -> None:
    """Print `error: MESSAGE` and exit with `code`. In a torchrun run, where every process
    checks the same inputs and stops at the same step, only each machine's first process
    prints, unless the failure is this process's own (`every_process`: a bug)."""
    if os.environ.get("NOODLE_DEBUG") == "1":
        traceback.print_exc()
    if every_process or machines_first_process():
        rank = f"process {os.environ['RANK']}: " if every_process and later_process() else ""
        print(f"error: {rank}{message}", file=sys.stderr)
    sys.exit(code)


def interruption_message(exc: Interrupted, args: list[str]) -> str:
    """What stopped the command and, if the run was saved, the exact command to resume it."""
    if exc.resume_step is None:
        return f"interrupted by {exc}"
    resume = [] if "--resume" in args else ["--resume"]
    command = shlex.join(["noodle", *args, *resume])
    if "WORLD_SIZE" in os.environ:  # started by torchrun, which must start it again
        command = f"torchrun [its options] -m {command}"
    return (
        f"interrupted by {exc} at step {exc.resume_step}; the resume state is saved. "
        f"Continue with: {command}"
    )


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_raises_interrupted() -> Iterator[None]:
    """SIGTERM becomes an exception, as SIGINT is a KeyboardInterrupt, so cleanup (of
    temporary files) runs wherever it lands; training catches both to save its state."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def usage_error_message(exc: TyperException) -> str:
    """A wrong command line's error, after printing the usage line of the command it names."""
    message = exc.format_message()
    context = getattr(exc, "ctx", None)
    if context is None:
        return message
    print(context.get_usage(), file=sys.stderr)
    if not message.endswith((".", "?")):
        message += "."
    return f"{message} See '{context.command_path} --help'."


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: one `error: ...` line and a non-zero exit for every failure.

    `noodle` alone prints the help and exits 0: it is how a newcomer asks what the command
    does, as `noodle --help` is, and nothing went wrong."""
    args = sys.argv[1:] if argv is None else argv
    try:
        with sigterm_raises_interrupted():
            command = typer.main.get_command(app)
            code = command.main(args=args or ["--help"], prog_name="noodle", standalone_mode=False)
    except TyperException as exc:  # typer's (vendored click's) usage errors carry exit code 2
        fail(usage_error_message(exc), exc.exit_code)
    except NoodleError as exc:
        fail(str(exc), exc.exit_code)
    except Interrupted as exc:
        fail(interruption_message(exc, args), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 128 + signal.SIGINT)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:  # a bug: still one line, with the traceback under NOODLE_DEBUG=1
        fail(f"{type(exc).__name__}: {exc}", 1, every_process=True)
    sys.exit(code if isinstance(code, int) else 0)

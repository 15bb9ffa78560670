"""The `noodle` command line: parses options and hands over to the modules that do the work."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer

from noodle import __version__
from noodle.errors import NoodleError
from noodle.progress import Reporter
from noodle.training import Interrupted

app = typer.Typer(
    name="noodle",
    help="Noodle: a small language model you train yourself.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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
Corpus = Annotated[str, typer.Argument(help="Text corpus: a local file path.", show_default=False)]


def positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise click.UsageError(f"--{name} must be positive, got {value}")


@app.command()
def train(
    corpus: Corpus,
    output_dir: Annotated[
        Path, typer.Argument(help="Directory to write the model into.", show_default=False)
    ],
    model: Annotated[
        str, typer.Option(help="Preset (somen, soba, udon) or a CONFIG.json in model.json form.")
    ] = "somen",
    max_epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 20,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps, whatever the epochs.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per optimizer step.")] = 8,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate. Default: 1e-4 × batch-size / 4.", show_default=False
        ),
    ] = None,
    eval_interval: Annotated[int, typer.Option(help="Evaluate every this many steps.")] = 200,
    eval_batches: Annotated[
        int, typer.Option(help="Validation batches per evaluation (evenly spread).")
    ] = 50,
    patience: Annotated[
        int, typer.Option(help="Stop after this many evaluations without a 0.01 improvement.")
    ] = 10,
    seed: Annotated[int, typer.Option(help="Seed for weights, data order and dropout.")] = 1337,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run in OUTPUT_DIR.")
    ] = False,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="A tokenizer.json to use instead of the bundled GPT-NeoX-20B one."),
    ] = None,
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Keep the tokenized corpus in the cache.")
    ] = True,
    backend: Backend = None,
    dtype: Dtype = "auto",
) -> None:
    """Train a model from scratch on CORPUS into OUTPUT_DIR."""
    from noodle.pretrain import TrainOptions, default_lr
    from noodle.pretrain import train as run_train
    from noodle.training import TrainSettings

    for name, value in [
        ("max-epochs", max_epochs),
        ("max-steps", max_steps),
        ("batch-size", batch_size),
        ("lr", lr),
        ("eval-interval", eval_interval),
        ("eval-batches", eval_batches),
        ("patience", patience),
    ]:
        positive(name, value)
    settings = TrainSettings(
        max_epochs=max_epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr if lr is not None else default_lr(batch_size),
        eval_interval=eval_interval,
        eval_batches=eval_batches,
        patience=patience,
        seed=seed,
    )
    options = TrainOptions(
        corpus=corpus,
        output_dir=output_dir,
        model=model,
        tokenizer=str(tokenizer) if tokenizer else None,
        backend=backend,
        dtype=dtype,
        resume=resume,
        use_cache=cache,
        settings=settings,
    )
    reporter = Reporter()
    try:
        run_train(options, reporter)
    finally:
        reporter.close()


def not_implemented() -> None:
    raise NoodleError("not implemented yet")


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(help="Base model directory.")],
    input: Annotated[str, typer.Argument(help="Instruction file.")],
    output_dir: Annotated[Path, typer.Argument(help="Directory for the fine-tuned model.")],
) -> None:
    """Fine-tune MODEL on instruction data into OUTPUT_DIR."""
    not_implemented()


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Model directory.")],
    corpus: Corpus,
) -> None:
    """Measure MODEL's loss, perplexity and bits per byte on CORPUS."""
    not_implemented()


@app.command()
def chat(
    model: Annotated[
        str,
        typer.Argument(
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
        typer.Option(
            "--compile/--no-compile",
            help="Compile the decode step with torch.compile. Default: on CUDA only.",
            show_default=False,
        ),
    ] = None,
    backend: Backend = None,
    dtype: Dtype = "auto",
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


def version_callback(value: bool) -> None:
    if value:
        print(f"noodle {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """Noodle: a small language model you train yourself."""


def fail(message: str, code: int) -> None:
    if os.environ.get("NOODLE_DEBUG") == "1":
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: one `error: ...` line and a non-zero exit for every failure."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="noodle", standalone_mode=False)
    except click.UsageError as exc:
        fail(exc.format_message(), 2)
    except click.exceptions.Abort:
        fail("interrupted", 130)
    except NoodleError as exc:
        fail(str(exc), exc.exit_code)
    except Interrupted as exc:
        fail(
            f"interrupted by {exc}; the resume state is saved: rerun with --resume",
            128 + exc.signum,
        )
    except KeyboardInterrupt:
        fail("interrupted", 128 + signal.SIGINT)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:  # a bug: still one line, with the traceback under NOODLE_DEBUG=1
        fail(f"{type(exc).__name__}: {exc}", 1)
    sys.exit(code if isinstance(code, int) else 0)

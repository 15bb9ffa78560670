"""Fine-tuning with every weight against LoRA: peak GPU memory, tokens/s, trained
parameters and the validation loss each reaches on the same instruction file in the same
training time.

There is no pretrained soba: the base model is a soba initialised at random (seed 0) and
saved as a model directory, and the instruction file is synthetic, written here: questions
whose answers follow from them (sums, reversed word lists, sorted numbers) or from a
made-up table of capitals that the training examples share with the validation ones. From
a random base both runs learn the format and the tasks from scratch, so the losses say how
far each gets in the time, not how well LoRA adapts a real model.

Each run is a child process (its own peak memory), set up as `noodle finetune` sets a run
up (the base loaded, adapters added and the frozen weights kept in the autocast precision
for LoRA, the learning rate its default for the batch size) and driving the Trainer's own
training step for `--seconds` of training after `--warmup` steps, then evaluating on every
validation example.

    PYTHONPATH=. python benchmarks/lora.py --device cuda
    PYTHONPATH=. python benchmarks/lora.py --device cpu --model CONFIG.json --seconds 2 \\
        --examples 80 --rank 4
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from noodle.checkpoint import ModelDir, model_metadata, open_model_dir
from noodle.config import LoraSettings, resolve_model_config
from noodle.device import select_device, select_dtype, synchronize
from noodle.evaluation import evaluate
from noodle.instructions import Instruction, format_block, load_examples, split_examples
from noodle.model import NoodleModel
from noodle.parallel import Parallel
from noodle.progress import Reporter
from noodle.tokenizer import load_tokenizer
from noodle.train.finetune import model_to_finetune
from noodle.train.loop import Trainer
from noodle.train.settings import (
    FINETUNE_DEFAULTS,
    LORA_FINETUNE_DEFAULTS,
    TrainSettings,
)

WORDS = ["apple", "river", "stone", "cloud", "horse", "lamp", "garden", "window", "paper"]
WORDS += ["candle", "forest", "bottle", "mirror", "bridge", "castle", "dragon", "tiger"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po"]
QUIET = Reporter(interactive=False, quiet=True)
GIB = 2**30


def made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def synthetic_examples(count: int, seed: int) -> list[Instruction]:
    """Questions a model can learn to answer: arithmetic, word and number manipulation,
    and lookups in a made-up table of 200 countries."""
    rng = random.Random(seed)
    capitals = {made_up_word(rng): made_up_word(rng) for _ in range(200)}
    countries = list(capitals)
    examples = []
    for _ in range(count):
        task = rng.randrange(4)
        if task == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            examples.append(Instruction(f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."))
        elif task == 1:
            words = rng.sample(WORDS, rng.randint(3, 6))
            examples.append(
                Instruction(
                    "Reverse the order of these words.", " ".join(words), " ".join(words[::-1])
                )
            )
        elif task == 2:
            numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 7))]
            examples.append(
                Instruction(
                    "Sort these numbers from smallest to largest.",
                    " ".join(map(str, numbers)),
                    " ".join(map(str, sorted(numbers))),
                )
            )
        else:
            country = rng.choice(countries)
            examples.append(
                Instruction(
                    f"What is the capital of {country}?",
                    "",
                    f"The capital of {country} is {capitals[country]}.",
                )
            )
    return examples


def write_base(directory: Path, model: str, device: torch.device) -> None:
    """A randomly initialised model (seed 0) saved as a model directory with the bundled
    tokenizer, as `noodle train` would leave it."""
    tokenizer = load_tokenizer()
    preset, config = resolve_model_config(model, tokenizer.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        weights = {k: v.cpu() for k, v in NoodleModel(config).state_dict().items()}
    out = ModelDir(directory)
    out.write_weights(weights)
    out.write_tokenizer(tokenizer)
    summary = {"kind": "train", "status": "finished", "source": "random (benchmarks/lora.py)"}
    out.write_metadata(model_metadata(config, preset, tokenizer, summary))


def measure(args: argparse.Namespace) -> dict:
    """One run (`args.run`: full or lora) for `args.seconds` of training steps."""
    device = select_device(args.device)
    amp_dtype = select_dtype("auto", device)
    base = open_model_dir(args.base)
    config, tokenizer = base.config, base.tokenizer
    lora = LoraSettings(args.rank, 2.0 * args.rank) if args.run == "lora" else None
    defaults = FINETUNE_DEFAULTS if lora is None else LORA_FINETUNE_DEFAULTS
    settings = TrainSettings(
        batch_size=args.batch_size,
        lr=defaults.lr_at_batch_4 * args.batch_size / 4,
        max_epochs=10**6,  # the time budget ends the run; the rate stays near its peak
    )
    model = model_to_finetune(Parallel(), base, lora, settings, amp_dtype, device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples, _ = load_examples(args.instructions, tokenizer, config.ctx_len, QUIET)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
    train, validation = split_examples(
        examples, settings.batch_size, pad_id, settings.seed, args.instructions
    )
    every_example = -(-len(validation.examples) // settings.batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(settings.seed)
        trainer = Trainer(
            model, train, validation, settings, ModelDir(scratch), device, amp_dtype, QUIET, {}
        )

        def validation_loss() -> float:
            batches = validation.eval_batches(every_example)
            return evaluate(trainer.step_model, batches, device, amp_dtype)

        start_loss = validation_loss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, tokens, started = 0, 0, None
        while True:
            batch = train.get(*divmod(step, trainer.batches_per_epoch))
            trainer.train_step(batch, trainer.schedule.factor(step))
            step += 1
            if step == args.warmup:
                synchronize(device)
                started, tokens = time.perf_counter(), 0
            elif started is not None:
                tokens += batch[0].numel()
                if step % 10 == 0:
                    synchronize(device)
                    if time.perf_counter() - started >= args.seconds:
                        break
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        end_loss = validation_loss()
    return {
        "run": args.run,
        "lora": None if lora is None else lora.to_dict(),
        "parameters": config.parameter_count(),
        "trained_parameters": trained,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "steps": step,
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds),
        "peak_memory_gib": round(peak, 2) if peak is not None else None,
        "val_loss_start": round(start_loss, 4),
        "val_loss_end": round(end_loss, 4),
    }


def run_child(args: argparse.Namespace, run: str, base: Path, instructions: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--run", run, "--base", str(base)]
        command += ["--instructions", str(instructions), "--result", result.name]
        for option in ("device", "seconds", "warmup", "batch_size", "rank"):
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
        subprocess.run(command, check=True)
        return json.loads(Path(result.name).read_text())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="soba", help="a preset or a CONFIG.json")
    parser.add_argument("--seconds", type=float, default=45.0, help="training time of each run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="LoRA's rank (alpha: twice it)")
    parser.add_argument("--examples", type=int, default=6000, help="synthetic examples")
    parser.add_argument("--json", help="also write the results to this file")
    # A child process's own options: one run.
    parser.add_argument("--run", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--instructions", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.run:
        Path(args.result).write_text(json.dumps(measure(args)))
        return
    device = select_device(args.device)
    with tempfile.TemporaryDirectory() as work:
        base, instructions = Path(work) / "base", Path(work) / "instructions.txt"
        write_base(base, args.model, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the children measure the GPU's memory
        blocks = map(format_block, synthetic_examples(args.examples, seed=0))
        instructions.write_text("\n".join(blocks))
        rows = [run_child(args, run, base, instructions) for run in ("full", "lora")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.model} on {name} | torch {torch.__version__} | batch {args.batch_size} | "
        f"{args.seconds:g} s of training each | {args.examples:,} synthetic examples"
    )
    print(
        f"{'run':>8} {'trained':>13} {'peak GiB':>8} {'tokens/s':>9} {'steps':>6} "
        f"{'lr':>7} {'val loss':>16}"
    )
    for row in rows:
        peak = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "-"
        run = "full" if row["lora"] is None else f"LoRA r{row['lora']['rank']}"
        losses = f"{row['val_loss_start']:.3f} -> {row['val_loss_end']:.3f}"
        print(
            f"{run:>8} {row['trained_parameters']:>13,} {peak:>8} {row['tokens_per_s']:>9,} "
            f"{row['steps']:>6} {row['lr']:>7.1e} {losses:>16}"
        )
    full, lora = rows
    if full["peak_memory_gib"]:
        share = lora["peak_memory_gib"] / full["peak_memory_gib"]
        print(f"LoRA's peak memory is {share:.0%} of full fine-tuning's (goal: at most 40%)")
    if args.json:
        header = {"device": name, "torch": torch.__version__, "date": date.today().isoformat()}
        options = {name: getattr(args, name) for name in ("model", "seconds", "batch_size")}
        options |= {"rank": args.rank, "examples": args.examples, "warmup": args.warmup}
        Path(args.json).write_text(json.dumps({**header, **options, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

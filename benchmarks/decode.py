"""Decode speed: tokens/s of batch-1 generation after a short prompt, random weights.

    PYTHONPATH=. python benchmarks/decode.py                 # on CPU
    PYTHONPATH=. python benchmarks/decode.py --device cuda   # compiled decode step on CUDA

Each row generates --new-tokens tokens after a --prompt-tokens prompt through the same
path as `noodle chat` (Session.next_token with chat's default sampling settings), once to
warm up (and compile), then --repeats times; it reports the best and the median run.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from noodle.config import PRESETS
from noodle.device import DTYPES, select_device, synchronize
from noodle.inference import Session
from noodle.model import NoodleModel
from noodle.precision import prepare_for_inference
from noodle.sampling import SamplingSettings
from noodle.tokenizer import load_tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16,float16", help="comma-separated precisions"
    )
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off", "both"],
        default="auto",
        help="compile the decode step (auto: on CUDA only)",
    )
    parser.add_argument("--preset", default="somen", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: noodle's, one per free core)"
    )
    return parser.parse_args()


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_generation(
    session: Session, prompt: list[int], new_tokens: int, generator: torch.Generator
) -> float:
    """Seconds from pushing the prompt to having sampled the last new token."""
    session.reset()
    synchronize(session.device)
    started = time.perf_counter()
    session.push(prompt)
    for _ in range(new_tokens):
        session.next_token(SamplingSettings(), generator)
    synchronize(session.device)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    device = select_device(args.device)  # on the CPU, noodle's thread count (see device.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    config = PRESETS[args.preset]
    compile_modes = {
        "auto": [device.type == "cuda"],
        "on": [True],
        "off": [False],
        "both": [False, True],
    }[args.compile]
    torch.manual_seed(args.seed)
    base = NoodleModel(config)
    prompt = torch.randint(0, tokenizer.vocab_size, (args.prompt_tokens,)).tolist()
    print(
        f"{date.today()} | torch {torch.__version__} | {device} ({hardware_name(device)}, "
        f"{torch.get_num_threads()} threads) | {args.preset} | {args.prompt_tokens}-token "
        f"prompt, {args.new_tokens} new tokens, best/median of {args.repeats}"
    )
    print(f"{'dtype':<9} {'compile':<8} {'warm-up s':>9} {'best tok/s':>10} {'median tok/s':>12}")
    for name in args.dtypes.split(","):
        for compiled in compile_modes:
            model = NoodleModel(config)
            model.load_state_dict(base.state_dict())
            prepare_for_inference(model.to(device), DTYPES[name], compiled)
            session = Session(model, tokenizer, compile_decode=compiled)
            generator = torch.Generator(device).manual_seed(args.seed)
            warmup = time_generation(session, prompt, args.new_tokens, generator)
            runs = [
                args.new_tokens / time_generation(session, prompt, args.new_tokens, generator)
                for _ in range(args.repeats)
            ]
            print(
                f"{name:<9} {'on' if compiled else 'off':<8} {warmup:>9.1f} {max(runs):>10.0f} "
                f"{statistics.median(runs):>12.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

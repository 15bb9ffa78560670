"""FSDP on one GPU against the plain run, and the memory plan of a large model, in one go.

1. Speed: `noodle train CORPUS --model MODEL` for --max-steps steps as one plain process
   and as `torchrun --nproc_per_node=1 ... --fsdp`: tokens/s over each run's logged span
   (from its first training record, after compiling, to its last) and the peak GPU memory
   its metrics.jsonl records.
2. Plan: the memory per GPU of training --plan-model (udon) on --plan-gpus GPUs, whole
   (DDP) and sharded (FSDP, with and without activation checkpointing), from a meta-device
   build of the model and FSDP's rule for sharding (each tensor's first dimension split in
   equal, padded parts).
3. Check: the model's first --blocks blocks built, sharded and materialised by noodle's own
   FSDP path (`Parallel.build_model`) on this device, two AdamW steps on --plan-batch
   sequences of its full context, with and without activation checkpointing: the measured
   memory against the plan's figure for that model on this one GPU.

    PYTHONPATH=. python benchmarks/fsdp.py CORPUS --model soba --max-steps 30 --batch 16 \\
        --plan-model udon --plan-gpus 8 --blocks 4 [--json out.json]

Steps 1 and 3 need CUDA for memory figures; on a CPU they run (at a tiny size, for the
tests) and report none.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from noodle.config import ModelConfig, resolve_model_config
from noodle.device import autocast, select_device, select_dtype
from noodle.footprint import (
    TRAINING_BYTES_PER_PARAMETER,
    kept_bytes_per_token,
    logits_bytes_per_token,
)
from noodle.model import NoodleModel
from noodle.parallel import MULTICAST_OFF, Parallel
from noodle.tokenizer import load_tokenizer
from noodle.train.optim import build_optimizers
from noodle.train.settings import TrainSettings

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
BFLOAT16_BYTES = 2
# Activations a block keeps for its backward pass, in bytes per token and per unit of
# emb_dim, in 16-bit precision with flash attention (Korthikanti et al., 2022: 34 s·h).
ACTIVATION_BYTES = 34


# -- 1. speed -------------------------------------------------------------------------------


def timed_run(command: list[str], out: Path, env: dict) -> dict:
    subprocess.run(command, env=env, check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    first, last = train[0], train[-1]
    span = max(last["time"] - first["time"], 1e-9)
    return {
        "steps": last["step"],
        "tokens_per_s": round((last["tokens_seen"] - first["tokens_seen"]) / span),
        "peak_memory_gb": last.get("peak_memory_gb"),
    }


def speed(args: argparse.Namespace, work: Path, env: dict) -> dict:
    train = ["train", args.corpus]
    options = ["--model", args.model, "--batch-size", str(args.batch)]
    options += ["--max-steps", str(args.max_steps), *shlex.split(args.train_args)]
    plain = [sys.executable, "-m", "noodle", *train, str(work / "plain"), *options]
    sharded = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    sharded += ["--nproc_per_node=1", "-m", "noodle", *train, str(work / "fsdp"), *options]
    sharded += ["--fsdp"]
    return {
        "plain": timed_run(plain, work / "plain", env),
        "fsdp": timed_run(sharded, work / "fsdp", env),
        "commands": [shlex.join(plain), shlex.join(sharded)],
    }


# -- 2. plan --------------------------------------------------------------------------------


def shard_numel(shape: torch.Size, gpus: int) -> int:
    """Elements of one GPU's shard of a tensor: its first dimension split in `gpus` equal
    parts, the last padded (FSDP2's layout)."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / gpus) * rest


@dataclass(frozen=True)
class Plan:
    states_gb: float  # weights, gradients and AdamW moments
    gathered_gb: float  # bfloat16 weights and gradients of the blocks being computed
    activations_gb: float  # kept for the backward pass, all blocks
    logits_gb: float
    total_gb: float


def memory_plan(
    config: ModelConfig, gpus: int, batch: int, sharded: bool, checkpointing: bool
) -> Plan:
    """Memory per GPU of a training step of `batch` sequences of ctx_len tokens per GPU.

    FSDP's padded shards, its gathered copies and a block's activations (Korthikanti's
    estimate) are the plan's own; what activation checkpointing keeps and the logits are
    counted as `noodle.footprint` counts them."""
    with torch.device("meta"):  # shapes only, whatever the size
        model = NoodleModel(config)
    shards = gpus if sharded else 1
    parameters = sum(shard_numel(p.shape, shards) for p in model.parameters())
    states = parameters * TRAINING_BYTES_PER_PARAMETER
    block = sum(p.numel() for p in model.blocks[0].parameters())
    outer = sum(p.numel() for p in model.parameters()) - block * config.n_layers
    # A block's bfloat16 weights, the next one's (prefetched), its bfloat16 gradients and
    # their float32 copy being reduced; the embedding and output layer stay gathered.
    gathered = (2 * 2 + 2 + 4) * block + 2 * outer if sharded else 0
    tokens = batch * config.ctx_len
    block_bytes = ACTIVATION_BYTES * config.emb_dim
    activations = tokens * kept_bytes_per_token(config, block_bytes, BFLOAT16_BYTES, checkpointing)
    logits = tokens * logits_bytes_per_token(config, BFLOAT16_BYTES)
    total = states + gathered + activations + logits
    return Plan(*(value / GB for value in (states, gathered, activations, logits, total)))


def plans(config: ModelConfig, gpus: int, batch: int) -> dict[str, Plan]:
    return {
        "DDP (whole replica)": memory_plan(config, gpus, batch, False, False),
        "FSDP": memory_plan(config, gpus, batch, True, False),
        "FSDP + activation checkpointing": memory_plan(config, gpus, batch, True, True),
    }


# -- 3. check -------------------------------------------------------------------------------


def measure(
    config: ModelConfig, device: torch.device, batch: int, checkpointing: bool, compile: bool
) -> dict:
    """Build `config` through noodle's FSDP path on this device, take two AdamW steps and
    read the memory: after building, after the second backward pass (weights, gradients
    and moments) and at the peak of the second step."""
    amp_dtype = select_dtype("auto", device)
    parallel = Parallel(fsdp=True, activation_checkpointing=checkpointing)
    cuda = device.type == "cuda"

    def allocated() -> float | None:
        return round(torch.cuda.memory_allocated(device) / GB, 2) if cuda else None

    with parallel.processes(device) as connected:
        mode = "default" if compile else None
        model = connected.build_model(config, device, 0, amp_dtype, mode)
        built = allocated()
        optimizers = build_optimizers(model, TrainSettings())
        inputs = torch.randint(0, config.vocab_size, (batch, config.ctx_len + 1), device=device)
        for step in range(2):
            if cuda and step == 1:
                torch.cuda.reset_peak_memory_stats(device)
            with autocast(device, amp_dtype):
                loss = model(inputs[:, :-1], inputs[:, 1:])
            loss.backward()
            states = allocated()  # weights, gradients and (after the first step) moments
            for optimizer in optimizers.values():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peak = round(torch.cuda.max_memory_allocated(device) / GB, 2) if cuda else None
        del model, optimizers
    return {"built_gb": built, "states_gb": states, "peak_gb": peak, "loss": float(loss.detach())}


def check(args: argparse.Namespace, config: ModelConfig, device: torch.device) -> dict:
    small = replace(config, n_layers=args.blocks)
    rows = {}
    for checkpointing in (False, True):
        name = "FSDP + activation checkpointing" if checkpointing else "FSDP"
        measured = measure(small, device, args.plan_batch, checkpointing, args.compile)
        planned = memory_plan(small, 1, args.plan_batch, True, checkpointing)
        rows[name] = {"measured": measured, "planned": planned.__dict__}
        gc.collect()  # FSDP's hooks hold the model in reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- report ---------------------------------------------------------------------------------


def print_plans(title: str, table: dict[str, Plan]) -> None:
    print(title)
    print(f"{'':<34}{'states':>8}{'gathered':>10}{'activ.':>8}{'logits':>8}{'total GB':>10}")
    for name, plan in table.items():
        print(
            f"{name:<34}{plan.states_gb:>8.1f}{plan.gathered_gb:>10.1f}"
            f"{plan.activations_gb:>8.1f}{plan.logits_gb:>8.1f}{plan.total_gb:>10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus")
    parser.add_argument("--model", default="soba")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=30, help="0 skips the speed runs")
    parser.add_argument("--train-args", default="", help="further `noodle train` options")
    parser.add_argument("--plan-model", default="udon")
    parser.add_argument("--plan-gpus", type=int, default=8)
    parser.add_argument("--plan-batch", type=int, default=1, help="sequences per GPU")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of the checked model")
    parser.add_argument("--device", default=None, help="for the check: cuda or cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    _, config = resolve_model_config(args.plan_model, load_tokenizer().vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **MULTICAST_OFF, "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        env["PYTHONPATH"] = str(REPO)
        runs = speed(args, Path(tmp), env) if args.max_steps else {}
    device = select_device(args.device)
    plan_table = plans(config, args.plan_gpus, args.plan_batch)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "speed": runs,
        "plan": {k: v.__dict__ for k, v in plan_table.items()},
        "check": check(args, config, device),
    }
    print(f"device {results['device']} | torch {results['torch']}")
    if runs:
        print(f"{args.model}, batch {args.batch}, {args.max_steps} steps on one GPU:")
    for name in ("plain", "fsdp") if runs else ():
        run = runs[name]
        print(f"  {name:<6} {run['tokens_per_s']:>10,} tokens/s  peak {run['peak_memory_gb']} GB")
    print_plans(
        f"{args.plan_model}: planned memory per GPU on {args.plan_gpus} GPUs, "
        f"{args.plan_batch} sequence(s) of {config.ctx_len} per GPU",
        plan_table,
    )
    print(f"check: {args.plan_model}'s first {args.blocks} blocks on this device, sharded alone")
    for name, row in results["check"].items():
        measured, planned = row["measured"], row["planned"]
        print(
            f"  {name:<32} states {measured['states_gb']} GB (planned "
            f"{planned['states_gb']:.2f}) | peak {measured['peak_gb']} GB (planned "
            f"{planned['total_gb']:.2f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Training throughput of `noodle train`'s real step: tokens/s, MFU and peak memory.

It drives the same Trainer (batch fetch, autocast, compiled model, fused AdamW, gradient
clipping, NaN guard) that `noodle train` runs, on random tokens.

    PYTHONPATH=. python benchmarks/train_speed.py --device cuda
    PYTHONPATH=. python benchmarks/train_speed.py --device cpu --shapes tiny:2 --steps 2
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/train_speed.py --device cpu \
        --shapes harusame:16,somen:8 --compile off --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from noodle.batching import TokenWindows
from noodle.checkpoint import ModelDir
from noodle.config import PRESETS, ModelConfig, config_from_dict
from noodle.device import select_device, select_dtype, synchronize
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.train.loop import Trainer
from noodle.train.settings import TrainSettings

SHAPES = {
    "tiny": ModelConfig(n_layers=2, emb_dim=64, n_heads=2, head_dim=32, hidden_dim=128, ctx_len=64),
    "somen": PRESETS["somen"],
    "gpt2": ModelConfig(
        n_layers=12, emb_dim=768, n_heads=12, head_dim=64, hidden_dim=3072, ctx_len=1024
    ),
    "soba": PRESETS["soba"],
    # With the 4,096-token vocabulary it learns from its corpus (--tokenizer bpe:4096).
    "harusame": replace(PRESETS["harusame"], vocab_size=4096),
}
# Dense bf16 tensor-core peak of an H100 SXM, the reference the nanoGPT MFU figures use.
PEAK_FLOPS = {"cuda": 989e12}


def flops_per_token(config: ModelConfig) -> float:
    """6 × (weights used in matmuls) + attention scores, as nanoGPT's estimate_mfu counts."""
    matmul_params = config.parameter_count() - config.vocab_size * config.emb_dim
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * config.ctx_len
    return 6 * matmul_params + attention


def shape_config(shape: str) -> ModelConfig:
    """A named shape, or a CONFIG.json in model.json's form."""
    if shape in SHAPES:
        return SHAPES[shape]
    return config_from_dict(json.loads(Path(shape).read_text()), shape)[0]


def measure(
    shape: str,
    batch: int,
    compile_model: bool,
    steps: int,
    warmup: int,
    device: torch.device,
    dropout: float | None = None,
    compile_mode: str = TrainSettings.compile_mode,
) -> dict:
    config = shape_config(shape)
    if dropout is not None:
        config = replace(config, dropout=dropout)
    amp_dtype = select_dtype("auto", device)
    torch.manual_seed(0)
    model = NoodleModel(config).to(device)
    windows = (warmup + steps) * batch
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, windows * config.ctx_len + 1)
    data = TokenWindows(tokens.astype(np.uint16), config.ctx_len, batch)
    settings = replace(
        TrainSettings(), batch_size=batch, compile=compile_model, compile_mode=compile_mode
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model,
            data,
            data,
            settings,
            ModelDir(tmp),
            device,
            amp_dtype,
            Reporter(quiet=True),
            identity={},
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for index in range(warmup + steps):
            if index == warmup:
                synchronize(device)
                started = time.perf_counter()
            loss, _, _ = trainer.train_step(trainer.train_data.get(0, index), lr_factor=1.0)
        synchronize(device)
        elapsed = time.perf_counter() - started
    tokens_per_s = steps * batch * config.ctx_len / elapsed
    peak = PEAK_FLOPS.get(device.type)
    return {
        "shape": shape,
        "batch": batch,
        "compile": compile_model and compile_mode,
        "dropout": config.dropout,
        "tokens_per_s": round(tokens_per_s),
        "mfu": round(tokens_per_s * flops_per_token(config) / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "step_ms": round(1000 * elapsed / steps, 2),
        "final_loss": round(float(loss), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--shapes",
        default="somen:8,somen:64,gpt2:16,soba:8",
        help="SHAPE:BATCH,...; a shape is one of the names above or a CONFIG.json",
    )
    parser.add_argument("--compile", choices=["on", "off", "both"], default="on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--dropout", type=float, help="instead of each shape's own")
    parser.add_argument(
        "--compile-mode", default=TrainSettings.compile_mode, help="torch.compile mode"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    device = select_device(args.device)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    rows = []
    for item in args.shapes.split(","):
        shape, batch = item.rsplit(":", 1)
        for compile_model in modes:
            row = measure(
                shape,
                int(batch),
                compile_model,
                args.steps,
                args.warmup,
                device,
                args.dropout,
                args.compile_mode,
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name} | torch {torch.__version__}")
    print(f"{'shape':>6} {'batch':>5} {'compile':>7} {'tokens/s':>11} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(
            f"{r['shape']:>6} {r['batch']:>5} {r['compile']!s:>7} {r['tokens_per_s']:>11,} "
            f"{mfu:>6} {mem:>8}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()

"""Where a training step's time goes: torch.profiler over `noodle train`'s real step.

PYTHONPATH=. python benchmarks/profile_step.py --shape somen --batch 64
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
from torch.profiler import ProfilerActivity, profile

from benchmarks.train_speed import SHAPES
from noodle.batching import TokenWindows
from noodle.checkpoint import ModelDir
from noodle.device import select_device, select_dtype, synchronize
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.train.loop import Trainer
from noodle.train.settings import TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="somen", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = select_device(args.device)
    config = SHAPES[args.shape]
    model = NoodleModel(config).to(device)
    windows = (args.steps + 10) * args.batch
    tokens = np.random.default_rng(0).integers(0, 50277, windows * config.ctx_len + 1)
    data = TokenWindows(tokens.astype(np.uint16), config.ctx_len, args.batch)
    settings = replace(TrainSettings(), batch_size=args.batch, compile=not args.no_compile)
    trainer = Trainer(
        model,
        data,
        data,
        settings,
        ModelDir("/tmp/noodle-profile"),
        device,
        select_dtype("auto", device),
        Reporter(quiet=True),
        identity={},
    )
    for index in range(10):
        trainer.train_step(trainer.train_data.get(0, index), lr_factor=1.0)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for index in range(10, 10 + args.steps):
            trainer.train_step(trainer.train_data.get(0, index), lr_factor=1.0)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()

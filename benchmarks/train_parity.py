"""Speed does not change the math: the same tiny `noodle train` run on the CPU in float32
and on DEVICE as `noodle train` runs there by default (a GPU: bf16 autocast, compiled,
CUDA graphs, the fused loss), with their validation losses side by side.

The tests' story corpus (3,000 lines), a 2 x 64 model (dropout 0), batch 8, lr 0.003,
seed 1, an evaluation every 10 steps: the run of benchmarks/RESULTS.md's parity tables.
The CPU run uses one thread (the CPU figures move at the fourth decimal with the thread
count); the two runs go side by side.

    PYTHONPATH=. python benchmarks/train_parity.py --device cuda [--optimizer muon] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.stories import story_corpus

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {
    "n_layers": 2,
    "emb_dim": 64,
    "n_heads": 2,
    "head_dim": 32,
    "hidden_dim": 128,
    "ctx_len": 64,
    "dropout": 0.0,
}


def start_run(
    corpus: Path,
    model: Path,
    out: Path,
    backend: str,
    threads: int | None,
    args: argparse.Namespace,
) -> subprocess.Popen:
    """One `noodle train` run, started in the background."""
    command = [sys.executable, "-m", "noodle", "train", str(corpus), str(out)]
    command += ["--model", str(model), "--backend", backend, "--no-cache"]
    command += ["--max-steps", str(args.steps), "--eval-interval", str(args.eval_interval)]
    command += ["--batch-size", "8", "--lr", "0.003", "--seed", "1"]
    command += ["--optimizer", args.optimizer]
    command += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)


def validation_curve(run: subprocess.Popen, out: Path) -> dict[int, float]:
    """{step: validation loss} of a finished run."""
    if run.wait() != 0:
        raise SystemExit(f"error: {' '.join(run.args)} exited with {run.returncode}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="the backend compared with the CPU")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--lines", type=int, default=3000, help="lines of story corpus")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: the bundled one)")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    parser.add_argument("--json", help="also write the curves to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, model = work / "stories.txt", work / "tiny.json"
        corpus.write_text(story_corpus(args.lines))
        model.write_text(json.dumps(TINY_MODEL))
        # Both at once: the CPU run takes one core and leaves the device to the other.
        started = time.monotonic()
        cpu_run = start_run(corpus, model, work / "cpu", "cpu", 1, args)
        device_run = start_run(corpus, model, work / "device", args.device, None, args)
        cpu, device = (
            validation_curve(cpu_run, work / "cpu"),
            validation_curve(device_run, work / "device"),
        )
        seconds = time.monotonic() - started
    steps = sorted(set(cpu) & set(device))
    differences = {step: abs(device[step] - cpu[step]) for step in steps}
    worst = max(steps, key=differences.get)
    print(f"| step | {' | '.join(map(str, steps))} |")
    print(f"|---|{'---|' * len(steps)}")
    print(f"| CPU float32, 1 thread | {' | '.join(f'{cpu[s]:.4f}' for s in steps)} |")
    print(f"| {args.device} (its defaults) | {' | '.join(f'{device[s]:.4f}' for s in steps)} |")
    print(f"largest difference {differences[worst]:.4f} at step {worst} | {seconds:.0f} s")
    if args.json:
        report = {"steps": steps, "cpu": cpu, "device": device, "largest": differences[worst]}
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

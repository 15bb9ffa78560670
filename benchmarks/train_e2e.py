"""A whole `noodle train` run against its own training step, in one invocation.

Runs the real CLI on CORPUS (evaluations, best-weight and resume saves, logging and all)
and reads its metrics.jsonl: the run's wall-clock tokens/s over its training span (from
its first training record, once the first steps' compile is done, to its last record,
the final evaluation) against `benchmarks/train_speed.py`'s step at the same shape. With
--before, a second checkout of noodle (its folder holding the `noodle` package) is timed
the same way, for a before/after table.

    PYTHONPATH=. python benchmarks/train_e2e.py CORPUS --model somen --batch 64 \\
        --max-steps 3000 [--before .devdata/before] [--json out.json] \\
        [--train-args "--eval-interval 100"] [--step-args "--device cpu"]

The corpus is tokenized once, into a temporary token cache the runs share.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_training(
    checkout: Path, corpus: str, out: Path, args: argparse.Namespace, env: dict
) -> dict:
    out = out.resolve()
    command = [sys.executable, "-m", "noodle", "train", str(Path(corpus).resolve()), str(out)]
    command += ["--model", args.model, "--batch-size", str(args.batch)]
    command += ["--max-steps", str(args.max_steps), *shlex.split(args.train_args)]
    started = time.time()
    # Run from the checkout: `python -m` puts the working directory first on sys.path, so
    # from anywhere else another noodle could be the one imported.
    env = {**env, "PYTHONPATH": str(checkout)}
    subprocess.run(command, env=env, cwd=checkout, check=True)
    wall = time.time() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    first, last = train[0], records[-1]
    span = last["time"] - first["time"]
    tokens = train[-1]["tokens_seen"] - first["tokens_seen"]
    # An evaluation's time: from the record logged just before it to its own record.
    eval_seconds = []
    for record in evals:
        before = [r for r in train if r["time"] <= record["time"]]
        if before and before[-1]["step"] == record["step"]:
            eval_seconds.append(record["time"] - before[-1]["time"])
    return {
        "checkout": str(checkout),
        "steps": train[-1]["step"],
        "span_s": round(span, 2),
        "tokens_per_s": round(tokens / span),
        "wall_s": round(wall, 1),
        "evals": len(evals),
        "eval_s": round(sum(eval_seconds), 2),
        "first_eval_s": round(eval_seconds[0], 2) if eval_seconds else None,
        "best_val_loss": min(r["val_loss"] for r in evals if r["val_loss"] is not None),
    }


def step_speed(args: argparse.Namespace, env: dict) -> dict:
    """benchmarks/train_speed.py at the run's shape, in a process of its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as rows:
        command = [sys.executable, str(REPO / "benchmarks" / "train_speed.py")]
        command += ["--shapes", f"{args.model}:{args.batch}", "--json", rows.name]
        command += ["--steps", str(args.step_steps), *shlex.split(args.step_args)]
        subprocess.run(command, env={**env, "PYTHONPATH": str(REPO)}, check=True)
        return json.loads(Path(rows.name).read_text())


def tokenize(corpus: str, env: dict) -> None:
    """Fill the token cache, so that no run below pays for tokenizing."""
    code = (
        "import sys\n"
        "from noodle.corpus import load_token_stream\n"
        "from noodle.progress import Reporter\n"
        "from noodle.tokenizer import load_tokenizer\n"
        "load_token_stream(sys.argv[1], load_tokenizer(), Reporter(interactive=False))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, corpus], env={**env, "PYTHONPATH": str(REPO)}, check=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus")
    parser.add_argument("--model", default="somen")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--step-steps", type=int, default=50, help="timed steps of the step")
    parser.add_argument("--before", type=Path, help="an older checkout to time as well")
    parser.add_argument("--step-args", default="", help="further train_speed.py options")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where the runs write their model directories (default: a temporary folder, "
        "often in memory: a disk shows what saving costs)",
    )
    parser.add_argument("--train-args", default="", help="further `noodle train` options")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        tokenize(args.corpus, env)
        step = step_speed(args, env)
        runs = {}
        checkouts = {"after": REPO} | ({"before": args.before.resolve()} if args.before else {})
        out_dir = args.out_dir or Path(tmp)
        for name, checkout in checkouts.items():
            out = out_dir / name
            if out.exists():
                shutil.rmtree(out)
            runs[name] = run_training(checkout, args.corpus, out, args, env)
            print(json.dumps({name: runs[name]}), file=sys.stderr, flush=True)
    step_tokens = step["rows"][0]["tokens_per_s"]
    print(f"device {step['device']} | torch {step['torch']} | {args.model} batch {args.batch}")
    print(f"step benchmark: {step_tokens:,} tokens/s")
    print(f"{'run':>7} {'tokens/s':>10} {'of step':>8} {'evals':>5} {'eval s':>7} {'wall s':>7}")
    for name, run in runs.items():
        print(
            f"{name:>7} {run['tokens_per_s']:>10,} {run['tokens_per_s'] / step_tokens:>8.1%} "
            f"{run['evals']:>5} {run['eval_s']:>7.1f} {run['wall_s']:>7.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"step": step, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()

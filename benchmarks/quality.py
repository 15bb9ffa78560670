"""Quality per GPU-second: rows of benchmarks/QUALITY.md, trained and scored in one process.

A row is a training recipe (optimizer, schedule, peak learning rate, batch size, dropout,
warm-up, or any other training setting) trained on a corpus with a seed for a fixed
budget of training wall time, then scored by `noodle eval`'s bits per byte on held-out
text. Rows come from a JSON file (see benchmarks/quality_rows.json) or --row:

    PYTHONPATH=. python benchmarks/quality.py benchmarks/quality_rows.json \\
        [--only today,muon-wsd] [--time-budget 25] [--eval-subset 512] \\
        [--deadline 540] [--json $OUT/quality.json]

A rows file holds `rows` (objects with a `name` and any of `noodle train`'s options in
snake_case, TrainSettings fields such as warmup_steps or decay_fraction, `model`,
`dropout` (else `noodle train`'s choice), `time_fraction` (of --time-budget), `corpora`
and `seeds`), `defaults` for every row, and `compare`: the rows the others are measured
against. Any value may be an object keyed by corpus, e.g. {"gutenberg": 0, "tinystories":
0.1} (a corpus it leaves out gets the default). The corpora (see quality_corpora:
gutenberg, tinystories) are prepared from the original files in --data (default
.devdata/) into --work (default out/quality, kept between calls on a machine) by
background processes, while the first graphs compile; how a run is trained, timed and
scored: see quality_runs.

Runs go in the rows file's order (put the most telling first: --deadline skips the runs
that would end after it). Each prints one table row of benchmarks/QUALITY.md as it ends,
and the end a summary: per row and corpus the mean over seeds and, against each compared
row, the change and the time needed to reach that row's best.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from benchmarks.quality_corpora import CORPORA
from benchmarks.quality_runs import Bench, BenchOptions, CorpusData, Run
from noodle.cli import training_option_types
from noodle.device import device_type
from noodle.errors import NoodleError
from noodle.train.settings import PRETRAIN_DEFAULTS, TrainSettings

REPO = Path(__file__).resolve().parent.parent
# A run sets these itself; a row cannot.
CONTROLLED = {"max_steps", "max_epochs", "seed", "compile", "save_every", "save_interval_s"}
CONTROLLED |= {"tensorboard_dir", "drop_resume_state"}
RUN_KEYS = {"model", "dropout", "time_fraction"}
ROW_KEYS = {"name", "corpora", "seeds", *RUN_KEYS}

# -- the rows ------------------------------------------------------------------------------


def row_setting_names() -> set[str]:
    options = set(training_option_types(PRETRAIN_DEFAULTS))
    return (options | {f.name for f in fields(TrainSettings)}) - CONTROLLED


def expand_rows(document: dict, only: list[str] | None, seeds: list[int] | None) -> list[Run]:
    """The runs of a rows document, in its order: each row on each of its corpora with
    each of its seeds."""
    defaults = document.get("defaults", {})
    settable = row_setting_names()
    rows = document.get("rows", [])
    names = [row.get("name") for row in rows]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise NoodleError(f"no row named {', '.join(unknown)} (rows: {', '.join(names)})")
    runs = []
    for row in (row for row in rows if not only or row["name"] in only):
        merged = {**defaults, **row}
        bad = sorted(set(merged) - ROW_KEYS - settable)
        if bad:
            raise NoodleError(
                f"row {row.get('name')!r}: unknown setting(s) {', '.join(bad)} "
                f"(known: {', '.join(sorted(ROW_KEYS | settable))})"
            )
        for corpus in merged.get("corpora", list(CORPORA)):
            if corpus not in CORPORA:
                raise NoodleError(f"row {row['name']!r}: unknown corpus {corpus!r}")
            values = {
                key: value[corpus] if isinstance(value, dict) else value
                for key, value in merged.items()
                if key not in ("name", "corpora", "seeds")
                and (corpus in value if isinstance(value, dict) else True)
            }
            fixed = {key: values.pop(key) for key in RUN_KEYS & set(values)}
            row_seeds = merged.get("seeds", [1])
            row_seeds = row_seeds.get(corpus, [1]) if isinstance(row_seeds, dict) else row_seeds
            for seed in seeds or row_seeds:
                runs.append(Run(row["name"], corpus, seed, **fixed, options=values))
    return runs


def runs_device_type(device: str) -> str:
    """The type of device whose defaults the runs get: the one `--device` names, even on a
    machine without it (`--plan` for the GPU, on a laptop), else the one `auto` finds."""
    return device if device in ("cpu", "cuda", "mps") else device_type(device)


def load_runs(args: argparse.Namespace) -> tuple[list[Run], list[str]]:
    """The runs asked for, each one's settings checked before any is started."""
    try:
        document: dict = json.loads(args.rows.read_text()) if args.rows else {}
        document["rows"] = [*document.get("rows", []), *(json.loads(row) for row in args.row)]
    except (OSError, json.JSONDecodeError) as exc:
        raise NoodleError(f"cannot read the rows: {exc}") from None
    only = args.only.split(",") if args.only else None
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else None
    runs = expand_rows(document, only, seeds)
    if not runs:
        raise NoodleError("no rows to run (give a rows file or --row)")
    for run in runs:
        try:
            run.settings(runs_device_type(args.device))
            if run.dropout is not None and not 0 <= run.dropout < 1:
                raise NoodleError(f"dropout must be in [0, 1), got {run.dropout}")
            if run.time_fraction <= 0:
                raise NoodleError(f"time_fraction must be positive, got {run.time_fraction}")
        except (NoodleError, TypeError) as exc:
            raise NoodleError(f"row {run.row!r}: {exc}") from None
    compare = args.compare.split(",") if args.compare else document.get("compare", [])
    return runs, compare


# -- reporting -----------------------------------------------------------------------------

COLUMNS = ["row", "corpus", "seed", "optimizer", "schedule", "peak lr", "batch", "dropout"]
COLUMNS += ["warm-up", "steps", "train s", "tokens/s", "best val loss", "held-out bpb"]
TABLE_HEADER = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]


def table_row(result: dict) -> str:
    if result.get("error"):
        outcome = f"failed: {result['error']}"
        return f"| {result['row']} | {result['corpus']} | {result['seed']} | {outcome} |"
    early = " (early stop)" if result["stopped_early"] else ""
    bpb = result.get("heldout_bpb")
    cells = [
        result["row"],
        result["corpus"],
        result["seed"],
        result["optimizer"],
        result["schedule"],
        f"{result['lr']:.3g}",
        result["batch_size"],
        result["dropout"],
        result["warmup_steps"],
        f"{result['steps']}{early}",
        f"{result['train_s']:.1f}",
        f"{result['tokens_per_s']:,}" if result["tokens_per_s"] else "-",
        result["best_val_loss"],
        "-" if bpb is None else f"{bpb:.4f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def crossing_time(curve: list[list[float]], target: float) -> float | None:
    """When a held-out curve first reaches `target` (linear between checkpoints)."""
    previous = None
    for _, seconds, bpb in curve:
        if bpb <= target:
            if previous is None or previous[1] <= target:
                return seconds
            fraction = (previous[1] - target) / (previous[1] - bpb)
            return previous[0] + fraction * (seconds - previous[0])
        previous = (seconds, bpb)
    return None


def best_point(curve: list[list[float]]) -> tuple[float, float]:
    """(seconds, bits per byte) of the curve's lowest point."""
    _, seconds, bpb = min(curve, key=lambda point: point[2])
    return seconds, bpb


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_curve(runs: list[dict]) -> list[list[float]]:
    """The seeds' held-out curves averaged checkpoint by checkpoint (a row's seeds share
    their checkpoints; a run that stopped early ends the mean there)."""
    length = min(len(run["curve"]) for run in runs)
    points = [[run["curve"][i] for run in runs] for i in range(length)]
    return [
        [point[0][0], mean([p[1] for p in point]), mean([p[2] for p in point])] for point in points
    ]


def time_to_reach(runs: list[dict], reference: list[dict]) -> str:
    """The time `runs` need to reach the best held-out score of `reference` (on their
    mean curves), as a share of the time `reference` needed for it."""
    curve, reference_curve = mean_curve(runs), mean_curve(reference)
    if not curve or not reference_curve:
        return "-"
    reference_time, target = best_point(reference_curve)
    reached = crossing_time(curve, target)
    if reached is None or reference_time <= 0:
        return "not reached"
    return f"{100 * reached / reference_time:.0f}%"


def summarize(results: list[dict], compare: list[str]) -> list[str]:
    """Per row and corpus: the mean held-out bits per byte over seeds and, against each
    compared row, the change and the time this row needs to reach that row's best (as a
    share of the time that row needed; the curves' checkpoint subset, not the full test)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        if result.get("heldout_bpb") is not None:
            groups.setdefault((result["row"], result["corpus"]), []).append(result)
    header = "| row | corpus | seeds | held-out bpb (mean ± half range) |"
    for name in compare:
        header += f" vs {name} | time to {name}'s best |"
    lines = [header, "|" + "---|" * (4 + 2 * len(compare))]
    for (row, corpus), runs in groups.items():
        scores = [r["heldout_bpb"] for r in runs]
        spread = (max(scores) - min(scores)) / 2
        cells = [
            row,
            corpus,
            ",".join(str(r["seed"]) for r in runs),
            f"{mean(scores):.4f} ± {spread:.4f}",
        ]
        for name in compare:
            reference = groups.get((name, corpus))
            if not reference:
                cells += ["-", "-"]
                continue
            base = mean([r["heldout_bpb"] for r in reference])
            cells.append(f"{100 * (mean(scores) - base) / base:+.1f}%")
            cells.append(time_to_reach(runs, reference))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- the command ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="?", type=Path, help="a rows JSON file")
    parser.add_argument("--row", action="append", default=[], help="a row as JSON (repeatable)")
    parser.add_argument("--only", help="run only these rows (names, comma-separated)")
    parser.add_argument("--seeds", help="these seeds for every row (comma-separated)")
    parser.add_argument("--time-budget", type=float, default=120.0, help="training seconds a run")
    parser.add_argument("--steps", type=int, help="a fixed step count instead of a time budget")
    parser.add_argument("--eval-subset", type=int, default=512, help="test windows per checkpoint")
    parser.add_argument("--checkpoints", type=int, default=10, help="held-out measurements a run")
    parser.add_argument("--score-batch", type=int, default=128, help="batch of the final scoring")
    parser.add_argument(
        "--deadline", type=float, help="start no run that would end after this many seconds"
    )
    parser.add_argument(
        "--data", type=Path, default=REPO / ".devdata", help="the original corpus files"
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "out" / "quality", help="splits and token cache"
    )
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: the bundled one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--json", type=Path, help="also write every run's results here")
    parser.add_argument(
        "--load-compiled",
        type=Path,
        help="torch.compile's cache artifacts saved by an earlier call (skips most compiling)",
    )
    parser.add_argument("--save-compiled", type=Path, help="save them here at the end")
    parser.add_argument("--compare", help="measure against these rows (default: the file's)")
    parser.add_argument(
        "--plan", action="store_true", help="list the runs and a time estimate; run nothing"
    )
    parser.add_argument(
        "--report", type=Path, help="print the table and summary of an earlier --json; run nothing"
    )
    return parser.parse_args(argv)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class Preparing:
    """The corpora, prepared by one background process each (see quality_corpora) on half
    the cores, so that a run timed meanwhile keeps cores of its own; each is loaded once
    it is ready."""

    def __init__(self, names: list[str], args: argparse.Namespace) -> None:
        threads = str(max(1, (os.cpu_count() or 2) // 2))
        env = {**os.environ, "RAYON_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
        script = Path(__file__).with_name("quality_corpora.py")
        command = [sys.executable, str(script), "--data", str(args.data), "--work", str(args.work)]
        command += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        self.processes = {name: subprocess.Popen([*command, name], env=env) for name in names}
        self.loaded: dict[str, CorpusData] = {}

    def load(self, name: str, bench: Bench) -> CorpusData:
        if name not in self.loaded:
            if self.processes[name].wait() != 0:
                raise NoodleError(f"preparing corpus {name} failed (see above)")
            self.loaded[name] = bench.load(name)
        return self.loaded[name]

    def wait(self) -> None:
        for process in self.processes.values():
            process.wait()


def expected_seconds(run: Run, args: argparse.Namespace, results: list[dict]) -> float:
    """What `run` will likely cost: its training time, the least any run cost beyond
    that, and, for a model, dropout or batch size no run has had yet, what the first run
    cost beyond it (compiling)."""
    if not results:
        return 0.0 if args.steps else args.time_budget * run.time_fraction
    training = results[-1]["train_s"] if args.steps else args.time_budget * run.time_fraction
    beyond = [r["wall_s"] - r["train_s"] for r in results]
    graph = (run.model, run.dropout, run.options.get("batch_size"))
    seen = {(r["model"], r["dropout_given"], r["batch_size_given"]) for r in results}
    return training + min(beyond) + (beyond[0] if graph not in seen else 0.0)


def run_all(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    runs, compare = load_runs(args)
    os.environ["XDG_CACHE_HOME"] = str(args.work / "cache")  # one token cache for all
    corpora = [name for name in CORPORA if any(run.corpus == name for run in runs)]
    preparing = Preparing(corpora, args)
    if args.load_compiled and args.load_compiled.is_file():
        torch.compiler.load_cache_artifacts(args.load_compiled.read_bytes())
    options = BenchOptions(
        args.time_budget,
        args.steps,
        args.eval_subset,
        args.checkpoints,
        args.score_batch,
        args.work,
        args.tokenizer,
        args.device,
        args.dtype,
        args.compile,
    )
    bench = Bench(options)
    header = {"device": device_name(bench.device), "torch": torch.__version__, **asdict(options)}
    budget = f"{args.steps} steps" if args.steps else f"{args.time_budget:g} s of training"
    print(f"{header['device']} | torch {header['torch']} | {len(runs)} runs of {budget}")
    print("\n".join(TABLE_HEADER), flush=True)
    results: list[dict] = []
    try:
        for run in runs:
            elapsed = time.perf_counter() - started
            if args.deadline and elapsed + expected_seconds(run, args, results) > args.deadline:
                print(f"deadline: not run: {run.row} {run.corpus} seed {run.seed}")
                continue
            results.append(bench.run(run, functools.partial(preparing.load, run.corpus, bench)))
            print(table_row(results[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps({**header, "runs": results}, default=str))
    finally:
        bench.close()
        saved = torch.compiler.save_cache_artifacts() if args.save_compiled else None
        if saved:
            args.save_compiled.write_bytes(saved[0])
        preparing.wait()
        print("\n" + "\n".join(summarize(results, compare)))
        print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s", flush=True)


def report(args: argparse.Namespace) -> None:
    """The table and summary of the runs an earlier call saved with --json."""
    results = json.loads(args.report.read_text())["runs"]
    compare = args.compare.split(",") if args.compare else []
    if not compare and args.rows:
        compare = json.loads(args.rows.read_text()).get("compare", [])
    print("\n".join([*TABLE_HEADER, *map(table_row, results), "", *summarize(results, compare)]))


# Guesses for the plan, from the H200 (README: the graphs compile in about a minute).
COMPILE_GUESS_S, BEYOND_TRAINING_GUESS_S = 60.0, 3.0


def plan(args: argparse.Namespace) -> None:
    """The runs asked for, with their settings, and a guess at the seconds they take."""
    runs, _ = load_runs(args)
    graphs = set()
    for run in runs:
        settings = run.settings(runs_device_type(args.device))
        graphs.add((run.model, run.dropout, settings.batch_size))
        print(
            f"{run.row} | {run.corpus} | seed {run.seed} | {settings.optimizer} "
            f"{settings.schedule} lr {settings.lr:.3g} batch {settings.batch_size} "
            f"dropout {'default' if run.dropout is None else run.dropout} | "
            f"{run.time_fraction * args.time_budget:g} s"
        )
    training = sum(run.time_fraction * args.time_budget for run in runs)
    total = training + len(runs) * BEYOND_TRAINING_GUESS_S + len(graphs) * COMPILE_GUESS_S
    print(
        f"{len(runs)} runs, {training:.0f} s of training, {len(graphs)} sets of graphs to "
        f"compile: about {total:.0f} s, besides starting the machine (a guess: runs that "
        "stop early take less)"
    )


def main() -> None:
    args = parse_args()
    try:
        if args.report:
            report(args)
        elif args.plan:
            plan(args)
        else:
            run_all(args)
    except NoodleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Smoke runs of the benchmark scripts at tiny sizes, so they keep working; their timings
belong in benchmarks/RESULTS.md, not here."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ONE_THREAD, REPO, TINY_CONFIG, noodle_env


def run_script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=noodle_env(ONE_THREAD),
        cwd=REPO,
        timeout=300,
        check=False,
    )


def test_train_speed_runs_the_real_training_step_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    result = run_script(
        "benchmarks/train_speed.py",
        *("--device", "cpu", "--shapes", "tiny:2", "--steps", 2, "--warmup", 1),
        *("--compile", "off", "--json", out),
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == "tiny" and row["batch"] == 2 and row["compile"] is False
    assert row["tokens_per_s"] > 0 and 9 < row["final_loss"] < 12  # ~ln(50304) untrained
    assert "tokens/s" in result.stdout and "tiny" in result.stdout


def test_decode_benchmark_generates_on_cpu():
    result = run_script(
        "benchmarks/decode.py",
        *("--device", "cpu", "--dtypes", "float32", "--new-tokens", 4, "--repeats", 1),
    )
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[-1].split()
    assert row[:2] == ["float32", "off"] and float(row[3]) > 0


def test_train_e2e_times_a_real_run_against_the_step_on_cpu(tmp_path, corpus_file, tiny_tokenizer):
    out = tmp_path / "e2e.json"
    config = tmp_path / "tiny.json"  # a small vocabulary, for the tiny tokenizer
    config.write_text(json.dumps({**TINY_CONFIG, "vocab_size": 512}))
    result = run_script(
        "benchmarks/train_e2e.py",
        *(corpus_file, "--model", config, "--batch", 4, "--max-steps", 30),
        *("--step-steps", 2, "--json", out),
        "--train-args",
        f"--backend cpu --eval-interval 10 --eval-batches 2 --tokenizer {tiny_tokenizer}",
        *("--step-args", "--device cpu --compile off --warmup 1"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    run = report["runs"]["after"]
    assert run["steps"] == 30 and run["evals"] == 3 and run["tokens_per_s"] > 0
    assert report["step"]["rows"][0]["batch"] == 4
    assert "after" in result.stdout and "of step" in result.stdout


def test_fsdp_benchmark_times_both_runs_and_checks_the_memory_plan_on_cpu(
    tmp_path, tiny_config, corpus_file
):
    out = tmp_path / "fsdp.json"
    result = run_script(
        "benchmarks/fsdp.py",
        *(corpus_file, "--model", tiny_config, "--batch", 4, "--max-steps", 4),
        *("--train-args", "--backend cpu --eval-interval 2 --eval-batches 1"),
        *("--plan-model", tiny_config, "--plan-gpus", 2, "--blocks", 1),
        *("--device", "cpu", "--no-compile", "--json", out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert {name: run["steps"] for name, run in report["speed"].items() if name != "commands"} == {
        "plain": 4,
        "fsdp": 4,
    }
    plan = report["plan"]
    # Sharding over two GPUs halves the weights, gradients and moments.
    assert plan["FSDP"]["states_gb"] < plan["DDP (whole replica)"]["states_gb"]
    check = report["check"]["FSDP + activation checkpointing"]
    assert check["measured"]["loss"] > 0 and check["planned"]["total_gb"] > 0
    assert "tokens/s" in result.stdout and "planned" in result.stdout

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


def test_train_speed_runs_the_real_training_step_and_its_variants_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    result = run_script(
        "benchmarks/train_speed.py",
        *("--device", "cpu", "--shapes", "tiny:2", "--steps", 2, "--warmup", 1),
        *("--variants", "tiny:2:chunk256,tiny:2:mine", "--define", "mine:loss_chunk=5,dropout=0"),
        *("--compile", "off", "--json", out),
    )
    assert result.returncode == 0, result.stderr
    default, chunked, mine = json.loads(out.read_text())["rows"]
    assert default["shape"] == "tiny" and default["batch"] == 2 and default["compile"] is False
    assert default["tokens_per_s"] > 0 and 9 < default["final_loss"] < 12  # ~ln(50304) untrained
    assert default["loss_chunk"] == 0  # uncompiled: the plain loss
    assert (chunked["variant"], chunked["loss_chunk"], chunked["dropout"]) == ("chunk256", 256, 0.1)
    assert (mine["variant"], mine["loss_chunk"], mine["dropout"]) == ("mine", 5, 0.0)
    assert "tokens/s" in result.stdout and "| tiny | 2 | mine | 5 |" in result.stdout


def test_train_speed_starts_no_row_past_its_budget(tmp_path):
    result = run_script(
        "benchmarks/train_speed.py",
        *("--device", "cpu", "--shapes", "tiny:2", "--variants", "tiny:2:plain"),
        *("--steps", 1, "--warmup", 1, "--compile", "off", "--budget-s", 0),
    )
    assert result.returncode == 0, result.stderr
    assert "skipped (past --budget-s): tiny:2:default, tiny:2:plain" in result.stdout


def test_train_parity_compares_two_real_runs_on_cpu(tmp_path):
    out = tmp_path / "parity.json"
    result = run_script(
        "benchmarks/train_parity.py",
        *("--device", "cpu", "--steps", 2, "--eval-interval", 1, "--lines", 200, "--json", out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["steps"] == [1, 2] and report["cpu"] == report["device"]
    assert report["largest"] == 0 and "largest difference 0.0000" in result.stdout


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

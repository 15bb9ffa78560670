"""Smoke runs of the benchmark scripts at tiny sizes, so they keep working; their timings
belong in benchmarks/RESULTS.md, not here."""

from __future__ import annotations

import importlib
import json
import lzma
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ONE_THREAD, REPO, TINY_CONFIG, noodle_env, story_corpus


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


@pytest.fixture
def script_in_process(monkeypatch, capsys, one_torch_thread):
    """Run a benchmark script's main() in this process, as `python benchmarks/NAME.py ARGS`
    would, without the seconds of CPU a new interpreter spends importing torch; the
    processes the script starts get run_script's environment. Returns (exit code, stdout,
    stderr)."""
    for name, value in {"PYTHONPATH": str(REPO), **ONE_THREAD}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)

    def run(name: str, *args: object) -> tuple[int | str | None, str, str]:
        module = importlib.import_module(f"benchmarks.{name}")
        monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, args)])
        capsys.readouterr()
        try:
            with torch.random.fork_rng(devices=[]):  # its seeds stay out of later tests
                module.main()
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_train_speed_runs_the_real_training_step_and_its_variants_on_cpu(
    tmp_path, script_in_process
):
    out = tmp_path / "rows.json"
    code, stdout, stderr = script_in_process(
        "train_speed",
        *("--device", "cpu", "--shapes", "tiny:2", "--steps", 1, "--warmup", 1),
        *("--variants", "tiny:2:chunk256,tiny:2:mine", "--define", "mine:loss_chunk=5,dropout=0"),
        *("--compile", "off", "--json", out),
    )
    assert code == 0, stderr
    default, chunked, mine = json.loads(out.read_text())["rows"]
    assert default["shape"] == "tiny" and default["batch"] == 2 and default["compile"] is False
    assert default["tokens_per_s"] > 0 and 9 < default["final_loss"] < 12  # ~ln(50304) untrained
    assert default["loss_chunk"] == 0  # uncompiled: the plain loss
    assert (chunked["variant"], chunked["loss_chunk"], chunked["dropout"]) == ("chunk256", 256, 0.1)
    assert (mine["variant"], mine["loss_chunk"], mine["dropout"]) == ("mine", 5, 0.0)
    assert "tokens/s" in stdout and "| tiny | 2 | mine | 5 |" in stdout


def test_train_speed_starts_no_row_past_its_budget(script_in_process):
    code, stdout, stderr = script_in_process(
        "train_speed",
        *("--device", "cpu", "--shapes", "tiny:2", "--variants", "tiny:2:plain"),
        *("--steps", 1, "--warmup", 1, "--compile", "off", "--budget-s", 0),
    )
    assert code == 0, stderr
    assert "skipped (past --budget-s): tiny:2:default, tiny:2:plain" in stdout


def test_train_parity_compares_two_real_runs_on_cpu(tmp_path, tiny_tokenizer):
    out = tmp_path / "parity.json"
    result = run_script(
        "benchmarks/train_parity.py",
        *("--device", "cpu", "--steps", 2, "--eval-interval", 1, "--lines", 200),
        *("--tokenizer", tiny_tokenizer, "--json", out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["steps"] == [1, 2] and report["cpu"] == report["device"]
    assert report["largest"] == 0 and "largest difference 0.0000" in result.stdout


def test_decode_benchmark_generates_on_cpu(script_in_process):
    code, stdout, stderr = script_in_process(
        "decode",
        *("--device", "cpu", "--preset", "harusame", "--dtypes", "float32"),
        *("--new-tokens", 4, "--repeats", 1),
    )
    assert code == 0, stderr
    row = stdout.splitlines()[-1].split()
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


def quality_data(directory: Path) -> list[str]:
    """The two original corpus files quality.py splits, small: 20 books of stories, xz
    compressed and separated by <|endoftext|> lines, and a file of story paragraphs."""
    directory.mkdir()
    books = [story_corpus(30, seed=book) for book in range(20)]
    with lzma.open(directory / "gutenberg-train.txt.xz", "wt", encoding="utf-8") as out:
        out.write("<|endoftext|>\n".join(books))
    lines = story_corpus(300, seed=99).splitlines()
    paragraphs = [" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    (directory / "tinystories-sample.txt").write_text("\n\n".join(paragraphs) + "\n")
    return books


def test_quality_trains_scores_and_summarizes_rows_on_cpu(
    tmp_path, tiny_config, tiny_tokenizer, script_in_process, monkeypatch
):
    from benchmarks.quality_runs import CompileOnce

    # What the benchmark's process sets for all its runs, put back for the other tests.
    monkeypatch.setattr(CompileOnce, "compiled", {})
    dynamic = torch._dynamo.config.automatic_dynamic_shapes
    books = quality_data(tmp_path / "data")
    rows = {
        "compare": ["base"],
        "defaults": {"model": str(tiny_config), "batch_size": 4, "eval_interval": 10},
        "rows": [
            {"name": "base", "lr": 3e-3},
            {
                "name": "muon",
                "corpora": ["gutenberg"],
                "optimizer": "muon",
                "schedule": "wsd",
                "lr": 3e-3,
                "dropout": {"gutenberg": 0.1},
            },
        ],
    }
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out, work = tmp_path / "quality.json", tmp_path / "work"
    with torch._dynamo.config.patch(automatic_dynamic_shapes=dynamic):
        code, stdout, stderr = script_in_process(
            *("quality", tmp_path / "rows.json", "--data", tmp_path / "data"),
            *("--work", work, "--tokenizer", tiny_tokenizer, "--device", "cpu"),
            *("--time-budget", 0.3, "--eval-subset", 8, "--checkpoints", 3, "--json", out),
        )
    assert code == 0, stderr
    # Every tenth book (the 10th and the 20th) is the held-out test text, whole.
    assert (work / "gutenberg-test.txt").read_text() == "<|endoftext|>\n".join(
        [books[9], books[19]]
    )
    kept = [book for i, book in enumerate(books) if i % 10 != 9]
    assert (work / "gutenberg-train.txt").read_text() == "<|endoftext|>\n".join(kept)
    test_story = (work / "tinystories-test.txt").read_text()
    assert (
        test_story
        and test_story.split("\n\n")[0] not in (work / "tinystories-train.txt").read_text()
    )

    runs = json.loads(out.read_text())["runs"]
    assert [(r["row"], r["corpus"]) for r in runs] == [
        ("base", "gutenberg"),
        ("base", "tinystories"),
        ("muon", "gutenberg"),
    ]
    for run in runs:
        assert run["steps"] == run["planned_steps"] > 0 and run["train_s"] > 0
        assert 0 < run["heldout_bpb"] < 10 and run["best_val_loss"] > 0
        assert [point[0] for point in run["curve"]][-1] == run["steps"]
    assert (runs[2]["optimizer"], runs[2]["schedule"], runs[2]["dropout"]) == ("muon", "wsd", 0.1)
    assert runs[0]["dropout"] == 0.0  # the tiny CONFIG.json's own

    table = stdout.splitlines()
    assert sum(line.startswith("| base | ") for line in table) == 2 + 2  # runs and summary
    assert any(line.endswith("| vs base | time to base's best |") for line in table)
    (summary,) = [
        line for line in table if line.startswith("| muon | gutenberg | 1 | ") and "±" in line
    ]
    assert re.search(r"± \d\.\d+ \| [+-]\d+\.\d% \| (\d+%|not reached) \|$", summary)

    # The saved runs summarized again against another row, with nothing trained.
    code, again, stderr = script_in_process("quality", "--report", out, "--compare", "muon")
    assert code == 0, stderr
    assert any(line.endswith("| vs muon | time to muon's best |") for line in again.splitlines())
    assert "| muon | gutenberg | 1 | " in again and "| +0.0% | 100% |" in again


def test_quality_refuses_an_unknown_setting_before_running(tmp_path, script_in_process):
    code, _, stderr = script_in_process(
        *("quality", "--row", '{"name": "x", "learning_rate": 1}'),
        *("--device", "cpu", "--data", tmp_path, "--work", tmp_path / "work"),
    )
    assert code == 1
    assert stderr.startswith("error: row 'x': unknown setting(s) learning_rate (known: ")
    assert len(stderr.splitlines()) == 1
    assert not (tmp_path / "work").exists()  # nothing prepared, nothing run


def test_time_to_reach_reads_the_mean_curves():
    from benchmarks.quality import crossing_time, time_to_reach

    curve = [[10, 1.0, 3.0], [20, 2.0, 2.0], [30, 3.0, 1.5]]
    assert crossing_time(curve, 2.5) == 1.5  # halfway between the first two checkpoints
    assert crossing_time(curve, 3.5) == 1.0 and crossing_time(curve, 1.0) is None
    reference = [{"curve": [[10, 2.0, 2.5], [20, 4.0, 2.0]]}]
    seeds = [{"curve": curve}, {"curve": [[10, 1.0, 2.0], [20, 2.0, 2.0], [30, 3.0, 1.5]]}]
    # Mean curve (1, 2.5), (2, 2.0): it reaches 2.0 at 2 s, the reference needed 4 s.
    assert time_to_reach(seeds, reference) == "50%"
    assert time_to_reach(reference, seeds) == "not reached"


def test_fsdp_benchmark_times_both_runs_and_checks_the_memory_plan_on_cpu(
    tmp_path, tiny_config, corpus_file, tiny_tokenizer, script_in_process
):
    out = tmp_path / "fsdp.json"
    timed = tmp_path / "timed.json"  # the runs timed: a small vocabulary, for the tiny tokenizer
    timed.write_text(json.dumps({**TINY_CONFIG, "vocab_size": 512}))
    options = f"--backend cpu --eval-interval 2 --eval-batches 1 --tokenizer {tiny_tokenizer}"
    code, stdout, stderr = script_in_process(
        "fsdp",
        *(corpus_file, "--model", timed, "--batch", 4, "--max-steps", 4),
        *("--train-args", options),
        *("--plan-model", tiny_config, "--plan-gpus", 2, "--blocks", 1),
        *("--device", "cpu", "--no-compile", "--json", out),
    )
    assert code == 0, stderr
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
    assert "tokens/s" in stdout and "planned" in stdout


def test_lora_benchmark_compares_full_and_lora_fine_tuning_on_cpu(
    tmp_path, tiny_config, script_in_process
):
    out = tmp_path / "lora.json"
    code, stdout, stderr = script_in_process(
        "lora",
        *("--device", "cpu", "--model", tiny_config, "--seconds", 0, "--warmup", 2),
        *("--examples", 40, "--batch-size", 4, "--rank", 2, "--json", out),
    )
    assert code == 0, stderr
    full, lora = json.loads(out.read_text())["rows"]
    assert (full["run"], full["lora"]) == ("full", None)
    assert lora["lora"] == {"rank": 2, "alpha": 4.0, "targets": ["qkv", "proj", "up", "down"]}
    # Two blocks of four adapted layers: 2 × 2 × (64+192 + 64+64 + 64+128 + 128+64).
    assert lora["trained_parameters"] == 3072 < full["trained_parameters"] == full["parameters"]
    assert lora["lr"] == 10 * full["lr"] == 2e-4
    for row in (full, lora):
        assert row["steps"] >= 2 and row["tokens_per_s"] > 0 and row["peak_memory_gib"] is None
        assert 9 < row["val_loss_start"] < 12  # ~ln(50304): the base is random
    assert full["val_loss_start"] == lora["val_loss_start"]  # the same base and examples
    assert "LoRA r2" in stdout and "full" in stdout

"""Training over several processes on the CPU (gloo), given torchrun's variables (started by
torchrun where stopping and resuming are checked): DistributedDataParallel against one
process, one stop for all processes, resuming, FSDP, gradient accumulation, the global loss
of fine-tuning, and the errors of a batch that does not share out."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from noodle.config import ModelConfig, resolve_model_config
from noodle.evaluation import loss_sums
from noodle.model import NoodleModel
from noodle.tokenizer import load_tokenizer
from noodle.train.settings import TrainSettings
from tests.conftest import (
    ONE_THREAD,
    PAIRS,
    TINY_CONFIG,
    noodle_command,
    noodle_env,
    write_instructions,
)
from tests.tiny_runs import TinyRun, assert_same_files, read_metrics, saved_tensors

STEPS = 30
EVAL_INTERVAL = 10
OPTIONS = (
    *("--max-steps", STEPS, "--batch-size", 8, "--lr", 3e-3),
    *("--eval-interval", EVAL_INTERVAL, "--eval-batches", 4, "--patience", 100, "--seed", 7),
)
INTERRUPT_AFTER_STEP = 15


def torchrun_command(*args: object, processes: int = 2) -> list[str]:
    """`torchrun --nproc_per_node=PROCESSES -m noodle ARGS`, from this interpreter."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *(f"--nproc_per_node={processes}", "-m", "noodle", *map(str, args)),
    ]


def start_torchrun(*args: object, log: Path, env: dict) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(
            torchrun_command(*args), stdout=handle, stderr=subprocess.STDOUT, env=noodle_env(env)
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_processes(
    *args: object, log: Path, env: dict, processes: int = 2
) -> list[subprocess.Popen]:
    """`noodle ARGS` in PROCESSES processes given the variables torchrun gives its workers,
    without torchrun's own process (one more interpreter importing torch): for the runs
    about what the processes train and write, not about how torchrun starts or ends them."""
    meeting = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    meeting |= {"WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)}
    with log.open("w") as handle:
        return [
            subprocess.Popen(
                noodle_command(args),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=noodle_env({**env, **meeting, "RANK": str(rank), "LOCAL_RANK": str(rank)}),
            )
            for rank in range(processes)
        ]


def finish(*processes: subprocess.Popen) -> int:
    """Wait for the processes; once one fails, end the rest (as torchrun does: they could
    wait for it forever). The first failure's exit code, or 0."""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process in processes]
            if None not in codes or any(codes):
                break
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return next((process.returncode for process in processes if process.returncode), 0)


def process_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the process torchrun started for `rank`."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tasks = Path(f"/proc/{launcher.pid}/task")
        children = [
            int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()
        ]
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"torchrun started no process of rank {rank}")


def tiny_config(run: TinyRun) -> ModelConfig:
    return resolve_model_config(str(run.config), load_tokenizer(run.tokenizer).vocab_size)[1]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@dataclass
class Runs:
    """The module's runs of two processes, still going when the fixture returns: each test
    waits for those it checks while this process trains its own runs of one."""

    root: Path
    plain: TinyRun  # the tiny run on a model without dropout
    processes: dict[str, list[subprocess.Popen]]
    stopped_log: str  # of the run stopped by a SIGTERM to its second process
    stopped_summary: dict  # that run's training summary, as it stopped

    def finish(self, name: str) -> str:
        """Wait for the run `name`, which must succeed; its output."""
        log = (self.root / f"{name}.log").read_text
        assert finish(*self.processes[name]) == 0, log()
        return log()


@pytest.fixture(scope="module")
def runs(tiny_run: TinyRun, tmp_path_factory) -> Iterator[Runs]:
    """Side by side: two processes (DDP, two micro-batches each) on a model without dropout;
    and, on the tiny run's model with dropout (resuming exactly needs each process's RNG
    back), two processes uninterrupted and, under torchrun, two stopped by a SIGTERM to the
    second of them past step 15, then resumed with the command its message gives."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "no-dropout.json").write_text(json.dumps(TINY_CONFIG))
    plain = replace(tiny_run, config=root / "no-dropout.json")
    stopped = start_torchrun(
        *tiny_run.train_args(root / "stopped", *OPTIONS),
        log=root / "stopped.log",
        env=tiny_run.env,
    )
    processes = {
        "ddp": start_processes(
            *plain.train_args(root / "ddp", *OPTIONS, "--grad-accum", 2, "--drop-resume-state"),
            log=root / "ddp.log",
            env=tiny_run.env,
        ),
        "reference": start_processes(
            *tiny_run.train_args(root / "reference", *OPTIONS),
            log=root / "reference.log",
            env=tiny_run.env,
        ),
    }
    second = process_of_rank(stopped, 1)
    deadline = time.monotonic() + 120
    while not any(r["step"] >= INTERRUPT_AFTER_STEP for r in read_metrics(root / "stopped")):
        assert time.monotonic() < deadline and stopped.poll() is None, "no step 15"
        time.sleep(0.02)
    os.kill(second, signal.SIGTERM)
    finish(stopped)
    stopped_log = (root / "stopped.log").read_text()
    summary = json.loads((root / "stopped" / "model.json").read_text())["training"]
    (message,) = error_lines(stopped_log)
    command = shlex.split(message.partition(" -m ")[2])
    processes["resumed"] = [
        start_torchrun(*command[1:], log=root / "resumed.log", env=tiny_run.env)
    ]
    yield Runs(root, plain, processes, stopped_log, summary)
    for group in processes.values():  # any that a failed test left running
        finish(*group)


def test_two_processes_end_where_one_does_and_only_the_first_writes(
    runs, cli_in_process, one_torch_thread
):
    root = runs.root
    code, _, err = cli_in_process(
        *runs.plain.train_args(root / "single", *OPTIONS, "--drop-resume-state")
    )
    assert code == 0, err
    log = runs.finish("ddp")
    losses = [
        [r["val_loss"] for r in read_metrics(root / name) if r["kind"] == "eval"][-1]
        for name in ("single", "ddp")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    # Without the resume state, which the first process alone drops.
    assert "resume.safetensors" not in {p.name for p in (root / "single").iterdir()}
    assert sorted(p.name for p in (root / "ddp").iterdir()) == sorted(
        p.name for p in (root / "single").iterdir()
    )
    records = [(r["kind"], r["step"]) for r in read_metrics(root / "ddp")]
    assert len(records) == len(set(records)), "a record was written twice"
    summary = json.loads((root / "ddp" / "model.json").read_text())["training"]
    assert summary["status"] == "finished" and summary["steps"] == STEPS
    assert summary["tokens_seen"] == STEPS * 8 * 64  # the global batch's tokens
    lines = log.splitlines()
    assert [line.startswith("done: ") for line in lines].count(True) == 1
    assert log.count(f"eval step {EVAL_INTERVAL} ") == 1
    assert "2 processes (DDP)" in log


def test_fsdp_finetunes_like_one_process_saves_a_whole_model_and_resumes_alone(
    trained_base, tmp_path, cli_in_process, one_torch_thread
):
    """Two sharded processes with two micro-batches each end with one process's weights:
    the loss is the mean over all response tokens of the global batch (not a mean of
    means), and the base model's weights were scattered, not built whole, into shards."""
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS * 4)
    options = ("--backend", "cpu", "--max-steps", 8, "--batch-size", 4, "--lr", 1e-3)
    out = tmp_path / "sharded"
    sharded = start_processes(
        *("finetune", trained_base, instructions, out, *options),
        *("--grad-accum", 2, "--fsdp", "--activation-checkpointing"),
        log=tmp_path / "sharded.log",
        env=ONE_THREAD,
    )
    code, _, err = cli_in_process(
        "finetune", trained_base, instructions, tmp_path / "one", *options
    )
    assert code == 0, err
    log = (tmp_path / "sharded.log").read_text
    assert finish(*sharded) == 0, log()
    assert "2 processes (FSDP)" in log() and "Warning" not in log()
    expected = saved_tensors(tmp_path / "one" / "resume.safetensors")
    actual = saved_tensors(out / "resume.safetensors")
    assert expected.keys() <= actual.keys()
    # Float32 rounding differs with the order of the sums; AdamW magnifies it in weights
    # whose gradients are near zero. A mean of per-process or per-micro-batch means would
    # move the weights by a sizeable part of their updates (lr 1e-3 a step).
    for key, tensor in expected.items():
        if key.startswith("model."):
            torch.testing.assert_close(actual[key], tensor, rtol=1e-4, atol=2e-5)

    # Whole tensors, as one process writes them: chat loads the model by itself.
    code, reply, err = cli_in_process(
        "chat", out, "--prompt", PAIRS[0][0], "--max-tokens", 5, "--backend", "cpu"
    )
    assert code == 0 and reply.strip(), err
    code, _, err = cli_in_process(
        "finetune", trained_base, instructions, out, *options, "--resume", "--max-steps", 12
    )
    assert code == 0, err
    assert "resuming at step 8 " in err
    assert "saved by 2 process(es) and goes on with 1" in err
    summary = json.loads((out / "model.json").read_text())["training"]
    assert summary["status"] == "finished" and summary["steps"] == 12


def test_lora_adapters_train_alike_replicated_or_sharded_and_a_sharded_run_resumes_alone(
    trained_base, tmp_path, cli_in_process, one_torch_thread
):
    """Two processes train LoRA adapters as one process does: replicated with
    DistributedDataParallel, and sharded with their blocks (the frozen base too) by FSDP.
    Each saves whole adapters, the merged weights and a resume state of adapters alone."""
    instructions = write_instructions(tmp_path / "qa.txt", PAIRS * 4)
    options = ("--backend", "cpu", "--max-steps", 8, "--batch-size", 4, "--lr", 1e-3)
    options += ("--lora-rank", 4, "--eval-interval", 4)
    started = {
        name: start_processes(
            *("finetune", trained_base, instructions, tmp_path / name, *options, *extra),
            log=tmp_path / f"{name}.log",
            env=ONE_THREAD,
        )
        for name, extra in (("DDP", ()), ("FSDP", ("--fsdp",)))
    }
    one = tmp_path / "one"
    code, _, err = cli_in_process("finetune", trained_base, instructions, one, *options)
    assert code == 0, err
    adapters = saved_tensors(one / "adapters.safetensors")
    for name, processes in started.items():
        log = (tmp_path / f"{name}.log").read_text
        assert finish(*processes) == 0, log()
        assert f"2 processes ({name})" in log() and "Warning" not in log()
        for file in ("adapters.safetensors", "model.safetensors"):
            expected, actual = saved_tensors(one / file), saved_tensors(tmp_path / name / file)
            assert expected.keys() == actual.keys()
            for key, tensor in expected.items():  # float32 sums in another order
                torch.testing.assert_close(actual[key], tensor, rtol=1e-4, atol=2e-5)
        resume = saved_tensors(tmp_path / name / "resume.safetensors")
        assert {k for k in resume if k.startswith("model.")} == {f"model.{k}" for k in adapters}

    code, _, err = cli_in_process(
        "finetune",
        trained_base,
        instructions,
        tmp_path / "FSDP",
        *options,
        "--resume",
        *("--max-steps", 12),
    )
    assert code == 0, err
    assert "resuming at step 8 " in err
    summary = json.loads((tmp_path / "FSDP" / "model.json").read_text())["training"]
    assert summary["status"] == "finished" and summary["steps"] == 12


# Last of the tests of `runs`: the resumed run goes on while the tests above train theirs.
def test_a_sigterm_to_one_process_stops_both_at_one_step_and_the_run_resumes(runs):
    root, summary = runs.root, runs.stopped_summary
    step = summary["steps"]
    assert summary["status"] == "interrupted" and INTERRUPT_AFTER_STEP <= step < STEPS
    # One line, from the first process (the second one caught the signal), naming the step
    # the resume state holds, with each process's RNG state in it.
    (message,) = error_lines(runs.stopped_log)
    assert message.startswith(f"error: interrupted by SIGTERM at step {step}; ")
    state = saved_tensors(root / "stopped" / "resume.safetensors")
    assert {"rng.cpu", "rank1.rng.cpu"} <= state.keys()
    command = shlex.split(message.partition(" -m ")[2])
    assert command[:2] == ["noodle", "train"] and command[-1] == "--resume"

    runs.finish("reference")
    assert f"resuming at step {step} " in runs.finish("resumed")
    assert_same_files(
        root / "reference", root / "stopped", ("resume.safetensors", "model.safetensors")
    )


def test_gradient_accumulation_ends_with_the_weights_of_the_whole_batch(
    tiny_run, tiny_config, tmp_path, one_torch_thread
):
    """float32, no dropout: eight windows at once or as two micro-batches of four."""
    run = replace(tiny_run, config=tiny_config)
    settings = TrainSettings(max_steps=12, batch_size=8, lr=3e-3, eval_interval=6, eval_batches=2)
    whole = run.trainer(tmp_path / "whole", settings)
    whole.run()
    split = run.trainer(tmp_path / "split", replace(settings, grad_accum=2))
    split.run()
    # The halves' sums round differently, and Adam's division by the root of the second
    # moment enlarges that on rarely seen tokens' rows: up to 3.3e-6 after 12 steps on an
    # AMD EPYC. A wrong accumulation would be off by the learning rate's scale (3e-3).
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(split.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ("--batch-size", 7),
            "error: --batch-size 7 does not divide over 2 processes: each takes an equal share "
            "of the global batch; use a multiple of 2",
        ),
        (
            ("--batch-size", 6, "--grad-accum", 2),
            "error: --batch-size 6 does not divide over 2 processes × 2 micro-batches: each "
            "takes an equal share of the global batch; use a multiple of 4",
        ),
        (
            ("--fsdp", "--optimizer", "muon"),
            "error: --optimizer muon cannot train a sharded (FSDP) model: its Newton-Schulz "
            "step orthogonalises whole matrices, and FSDP gives each process a slice of each; "
            "use --optimizer adamw with FSDP, or Muon without --fsdp",
        ),
        (
            ("--tokenizer", "bpe:12"),
            "error: --tokenizer bpe:12: the vocabulary of a learned tokenizer must be a number "
            "from 512 to 65,536, e.g. bpe:4096",
        ),
    ],
)
def test_a_bad_training_option_is_a_one_line_usage_error_before_the_processes_meet(
    options, message, cli_in_process, tiny_run, tmp_path, monkeypatch
):
    """torchrun's variables, one process, no MASTER_ADDR: the check comes before the
    processes would meet (where the missing address would be the error)."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    code, out, err = cli_in_process(*tiny_run.train_args(tmp_path / "out", *options))
    assert (code, out, err.splitlines()) == (2, "", [message])
    assert not (tmp_path / "out").exists()


def test_a_later_process_leaves_reporting_a_bad_input_to_the_first(
    cli_in_process, tiny_run, tmp_path, monkeypatch
):
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    code, out, err = cli_in_process(*tiny_run.train_args(tmp_path / "out", "--batch-size", 7))
    assert (code, out, err) == (2, "", "")


def test_an_empty_share_of_an_evaluation_batch_adds_nothing(tiny_run):
    model = NoodleModel(tiny_config(tiny_run)).eval()
    inputs = torch.randint(0, 100, (3, 16))
    batch = (inputs, inputs.roll(-1, dims=1))
    empty = tuple(tensor[:0] for tensor in batch)
    cpu = torch.device("cpu")
    with_empty = loss_sums(model, [empty, batch], cpu, torch.float32)
    alone = loss_sums(model, [batch], cpu, torch.float32)
    assert [float(v) for v in with_empty] == [float(v) for v in alone]

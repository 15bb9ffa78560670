"""Faults with real processes, signals, pipes and file systems: Ctrl-C while the command
starts, SIGTERM while the tokenizer is read, two runs into one OUTPUT_DIR, a disk that fills
up, corpora read from pipes, and a model too large to load."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from noodle.checkpoint import WEIGHTS, ModelDir
from noodle.config import PRESETS
from noodle.errors import NoodleError
from noodle.model import weight_shapes
from noodle.train.lock import LOCK_FILE, RunLock
from tests.conftest import ONE_THREAD, noodle_command, noodle_env, run_noodle, start_noodle
from tests.tiny_runs import read_metrics, saved_tensors

# The inputs of conftest.trained_base sit beside its model directory.
TRAIN_OPTIONS = ("--backend", "cpu", "--batch-size", 8, "--lr", 3e-3, "--no-cache")


def base_inputs(trained_base: Path) -> tuple[str, ...]:
    """corpus, --model and --tokenizer of the run that made trained_base."""
    work = trained_base.parent
    return (
        str(work / "corpus.txt"),
        *("--model", str(work / "tiny.json"), "--tokenizer", str(work / "tokenizer.json")),
    )


def train_command(trained_base: Path, out: Path, *options: object) -> list[str]:
    corpus, *model = base_inputs(trained_base)
    return noodle_command(("train", corpus, out, *model, *TRAIN_OPTIONS, *options))


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- signals while starting up ----------------------------------------------------------

# The module whose line of `python -X importtime` (printed once it is imported) brings the
# signal: while the CLI's modules are imported, and once the command has imported torch
# (before any training).
STARTUP_MOMENTS = {"importing-the-cli": "typer.main", "starting-the-command": "torch"}


@pytest.mark.parametrize("moment", STARTUP_MOMENTS)
def test_ctrl_c_while_starting_is_one_line_and_exit_130(moment, trained_base, tmp_path):
    out = tmp_path / "model"
    command = train_command(trained_base, out)
    command.insert(1, "-X")
    command.insert(2, "importtime")
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=noodle_env()
    )
    try:
        for line in process.stderr:
            if line.rsplit("|", 1)[-1].strip() == STARTUP_MOMENTS[moment]:
                process.send_signal(signal.SIGINT)
                break
        rest = process.stderr.read()
        code = process.wait(timeout=60)
    finally:
        process.kill()
        process.stderr.close()
    lines = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert code == 130, rest[-2000:]
    assert lines in (["error: interrupted"], ["error: interrupted by SIGINT"]), lines
    assert not out.exists()


def test_sigterm_while_the_tokenizer_is_read_is_an_interruption(trained_base, tmp_path):
    """A tokenizer file that is a named pipe with nothing written to it holds the command in
    the middle of reading it."""
    tokenizer = tmp_path / "tokenizer.json"
    os.mkfifo(tokenizer)
    corpus, *_ = base_inputs(trained_base)
    process = subprocess.Popen(
        noodle_command(("train", corpus, tmp_path / "model", "--tokenizer", tokenizer)),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=noodle_env(),
    )
    writer = None

    def reader_opened() -> bool:
        nonlocal writer
        try:  # opening the write end without blocking succeeds once a reader has it open
            writer = os.open(tokenizer, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            return False
        return True

    try:
        wait_for(reader_opened, "the tokenizer to be opened")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        if writer is not None:
            os.close(writer)
    assert process.returncode == 143, stderr
    assert stderr == "error: interrupted by SIGTERM\n"


def test_a_signal_another_thread_receives_still_interrupts_reading_a_pipe(tmp_path):
    """The kernel may hand the process's SIGTERM to any of its threads (torch starts some):
    here a thread of the reading process sends it to itself, while the main thread waits in
    a read of a pipe whose writer is open and silent."""
    fifo = tmp_path / "tokenizer.json"
    os.mkfifo(fifo)
    program = f"""
import os, signal, threading, time
from noodle.cli import sigterm_raises_interrupted
from noodle.errors import Interrupted
from noodle.tokenizer import load_tokenizer

def silent_writer_then_signal():
    writer = os.open({str(fifo)!r}, os.O_WRONLY)  # waits for the reader
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    time.sleep(60)

with sigterm_raises_interrupted():
    threading.Thread(target=silent_writer_then_signal, daemon=True).start()
    try:
        load_tokenizer({str(fifo)!r})
    except Interrupted as exc:
        print("interrupted by", exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    assert done.stdout == "interrupted by SIGTERM\n", done.stderr


# -- two runs, one OUTPUT_DIR -------------------------------------------------------------


def test_a_run_refused_as_the_holder_takes_the_lock_names_the_holder(tmp_path):
    # The holder takes the lock, then writes its process id: a run refused in between
    # waits for the id instead of naming nobody.
    program = f"""
import fcntl, os, sys, time
fd = os.open({str(tmp_path / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(0.5)
os.pwrite(fd, f"{{os.getpid()}}\\n".encode(), 0)
sys.stdin.read()
"""
    holder = subprocess.Popen(
        [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(NoodleError, match=rf"another noodle run \(process {holder.pid}\)"):
            RunLock(tmp_path)
    finally:
        holder.communicate("", timeout=30)


def test_two_runs_started_together_into_one_directory_one_wins(trained_base, tmp_path):
    out = tmp_path / "model"
    command = train_command(trained_base, out, "--max-steps", 30, "--eval-interval", 10)
    logs = [tmp_path / f"run-{index}.log" for index in range(2)]
    runs = [start_noodle(*command[3:], stderr=log, env=ONE_THREAD) for log in logs]
    results = [
        (run.pid, run.wait(timeout=180), log.read_text())
        for run, log in zip(runs, logs, strict=True)
    ]

    assert sorted(code for _, code, _ in results) == [0, 1], results
    (winner, _, _), (_, _, refused) = sorted(results, key=lambda result: result[1])
    last = refused.splitlines()[-1]
    assert (
        f"is in use: another noodle run (process {winner}) is writing it" in last
        or "already holds a model; continue its run with --resume" in last
    ), last
    summary = json.loads((out / "model.json").read_text())["training"]
    assert summary["status"] == "finished" and summary["steps"] == 30
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # one run's records, not two interleaved


def test_a_run_holds_its_directory_until_it_is_killed(
    trained_base, tmp_path, cli_in_process, one_torch_thread
):
    out = tmp_path / "model"
    options = ("--max-steps", 5000, "--eval-interval", 2500)
    env = noodle_env(ONE_THREAD)
    holder = subprocess.Popen(
        train_command(trained_base, out, *options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for(lambda: (out / "resume.safetensors").exists(), "the first resume state")
        code, _, err = cli_in_process(*train_command(trained_base, out, *options, "--resume")[3:])
        assert holder.poll() is None, "the first run ended too soon for this test"
        assert code == 1
        assert err.splitlines()[-1] == (
            f"error: {out} is in use: another noodle run (process {holder.pid}) is writing it; "
            "wait for it to end or choose another output directory"
        )
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        holder.kill()

    # The kernel released the lock with the process: the run resumes (shortened).
    code, _, err = cli_in_process(
        *train_command(trained_base, out, *options[2:], "--max-steps", 20, "--resume")[3:]
    )
    assert code == 0, err
    assert "resuming at step 0 " in err
    assert json.loads((out / "model.json").read_text())["training"]["status"] == "finished"


# -- a full disk ------------------------------------------------------------------------

# Runs the command after "--" on a tmpfs of $1 bytes mounted (in a mount namespace of its
# own, so nothing outside sees it) over the directory $2, then copies what it left to $3.
ON_SMALL_DISK = (
    'mount -t tmpfs -o "size=$1" noodle-test "$2" || exit 99; disk=$2; copy=$3; shift 4; '
    '"$@"; code=$?; cp -a "$disk" "$copy"; exit $code'
)


def on_small_disk(size: int, disk: Path, copy: Path, command: list[str]):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command to mount a small file system with")
    disk.mkdir()
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", ON_SMALL_DISK]
    result = subprocess.run(
        [*unshare, "sh", str(size), str(disk), str(copy), "--", *command],
        capture_output=True,
        text=True,
        env=noodle_env(ONE_THREAD),
        timeout=300,
        check=False,
    )
    if result.returncode == 99 or "unshare: " in result.stderr:
        pytest.skip(f"cannot mount a small file system here: {result.stderr.strip()}")
    return result


def test_a_full_disk_leaves_the_previous_weights_and_a_model_json_that_describes_them(
    trained_base, tmp_path
):
    """A real file system that fills up: room for the tokenizer, the resume state saved
    before the first step (the weights and the RNG: the optimizer has no state yet) and one
    copy of the weights, but not for writing a second copy beside the first. The first
    evaluation's weights are saved; the second's (an improvement) cannot be."""
    weights = (trained_base / WEIGHTS).stat().st_size
    tokenizer = (trained_base / "tokenizer.json").stat().st_size
    room = tokenizer + weights * 5 // 2 + 128 * 1024
    disk, copy = tmp_path / "disk", tmp_path / "after"
    command = train_command(trained_base, disk / "model", "--max-steps", 40, "--eval-interval", 10)
    result = on_small_disk(room, disk, copy, command)

    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot write {disk / 'model' / WEIGHTS}: No space left on device"
    )
    model = copy / "model"
    summary = json.loads((model / "model.json").read_text())["training"]
    on_disk = ModelDir(model).read_best_weights()
    assert (summary["best_step"], summary["best_val_loss"]) == (on_disk.step, on_disk.val_loss)
    assert on_disk.step == 10 and summary["status"] == "failed"
    assert [p.name for p in model.iterdir() if p.name.endswith(".tmp")] == []
    assert run_noodle("info", model).returncode == 0
    assert saved_tensors(model / WEIGHTS).keys() == saved_tensors(trained_base / WEIGHTS).keys()


# -- pipes ------------------------------------------------------------------------------


def test_a_corpus_from_a_fifo_or_a_process_substitution_is_streamed(
    trained_base, tmp_path, cli_in_process, one_torch_thread
):
    corpus = Path(base_inputs(trained_base)[0])
    evaluate = ("eval", trained_base, "--json", "--backend", "cpu")
    code, out, err = cli_in_process(*evaluate, corpus)
    assert code == 0, err
    expected = json.loads(out)["tokens"]

    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=lambda: fifo.write_bytes(corpus.read_bytes()), daemon=True)
    feeder.start()
    code, out, err = cli_in_process(*evaluate, fifo)
    feeder.join(timeout=30)
    assert code == 0, err
    assert json.loads(out)["tokens"] == expected
    assert f"not caching the tokens of {fifo}: a pipe or device is read once" in err

    # What bash's <(gzip -c CORPUS) passes: a /dev/fd path to a pipe, here carrying the
    # corpus gzip-compressed.
    read_end, write_end = os.pipe()
    compressed = gzip.compress(corpus.read_bytes())
    feeder = threading.Thread(target=write_and_close, args=(write_end, compressed), daemon=True)
    feeder.start()
    try:
        code, out, err = cli_in_process(*evaluate, f"/dev/fd/{read_end}")
    finally:
        feeder.join(timeout=30)
        os.close(read_end)
    assert code == 0, err
    assert json.loads(out)["tokens"] == expected


def write_and_close(fd: int, data: bytes) -> None:
    with open(fd, "wb") as pipe:
        pipe.write(data)


# -- a model too large to load ------------------------------------------------------------


def sparse_model(directory: Path, config) -> Path:
    """A model directory whose weights file has a real header for `config` and no data: a
    sparse file, as large as the weights, that takes no room on disk."""
    directory.mkdir()
    header, offset = {}, 0
    for name, shape in weight_shapes(config):
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with (directory / WEIGHTS).open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        handle.truncate(8 + len(encoded) + offset)
    (directory / "model.json").write_text(json.dumps({**config.to_dict(), "preset": "udon"}))
    return directory


def test_info_describes_a_model_too_large_for_chat_and_eval_which_refuse_it(
    tmp_path, cli_in_process
):
    model = sparse_model(tmp_path / "udon", PRESETS["udon"])
    parameters = f"{PRESETS['udon'].parameter_count():,}"

    code, out, err = cli_in_process("info", model)
    assert code == 0, err
    assert parameters in out

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("once upon a time\n")
    for command, purpose in (("chat", "to chat"), ("eval", "to evaluate")):
        extra = ("--prompt", "hi") if command == "chat" else (corpus,)
        code, out, err = cli_in_process(command, model, *extra, "--backend", "cpu")
        assert code == 1 and out == ""
        assert err.startswith(f"error: model {model} ({parameters} parameters) needs about ")
        assert f" GB {purpose} (weights " in err and "but cpu has " in err

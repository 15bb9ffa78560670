"""Atomic writes: a write that fails or is killed at any point leaves the previous file
whole, and a failure leaves no temporary file behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch

from noodle.checkpoint import ModelDir, atomic_write_bytes, model_metadata
from noodle.config import ModelConfig
from noodle.errors import NoodleError
from noodle.model import NoodleModel
from noodle.tokenizer import load_tokenizer
from tests.conftest import noodle_env
from tests.tiny_runs import directory_snapshot

OLD = b"the previous, complete contents\n"
NEW = b"new contents " * 100_000
REAL_FDOPEN = os.fdopen


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def raising(exception: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise exception

    return fail


class HalfWriter:
    """A file handle that writes half of what it is given, then finds the disk full."""

    def __init__(self, *fdopen_args: object, **fdopen_kwargs: object) -> None:
        self.handle = REAL_FDOPEN(*fdopen_args, **fdopen_kwargs)

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise os_error(errno.ENOSPC)

    def __enter__(self) -> HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


# Where a write can fail: the os function replaced, and what replaces it.
FAILURES = {
    "disk-full-mid-write": ("fdopen", HalfWriter),
    "fsync-fails": ("fsync", raising(os_error(errno.ENOSPC))),
    "rename-fails": ("replace", raising(os_error(errno.EIO))),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_write_keeps_the_previous_file(failure, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, OLD)
    monkeypatch.setattr(os, *FAILURES[failure])

    with pytest.raises(NoodleError, match=rf"^cannot write {target}: \w"):
        atomic_write_bytes(target, NEW)

    assert target.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_signal_during_a_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "resume.safetensors"
    atomic_write_bytes(target, OLD)
    monkeypatch.setattr(os, "fsync", raising(KeyboardInterrupt()))

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, NEW)

    assert target.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_saves_leave_every_model_dir_file_intact(tmp_path, monkeypatch):
    out = ModelDir(tmp_path / "model")
    config = ModelConfig(
        n_layers=1, emb_dim=16, n_heads=2, head_dim=8, hidden_dim=32, ctx_len=8, vocab_size=128
    )
    tokenizer = load_tokenizer()
    model = NoodleModel(config)

    def save_all(version: int) -> list[Callable[[], None]]:
        return [
            lambda: out.write_metadata(
                model_metadata(config, "custom", tokenizer, {"steps": version})
            ),
            lambda: out.write_tokenizer(tokenizer),
            lambda: out.write_weights(model.state_dict()),
            lambda: out.save_resume_state({"w": torch.full((4,), version)}, {"step": version}),
        ]

    for save in save_all(1):
        save()
    before = directory_snapshot(out.path)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(os, "fsync", raising(os_error(errno.ENOSPC)))

    for save in save_all(2):
        with pytest.raises(NoodleError, match="No space left on device"):
            save()

    assert directory_snapshot(out.path) == before  # same files (no temporary ones), same bytes


# Writes NEW over the file in argv[1], announcing when the bytes are written but not yet
# renamed into place, then stalls there to be killed.
KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from noodle.checkpoint import atomic_write_bytes

    def stall(fd):
        print("written", flush=True)
        time.sleep(120)

    os.fsync = stall
    atomic_write_bytes(Path(sys.argv[1]), b"new contents " * 1_000_000)
    """
)


def test_process_killed_mid_save_leaves_the_previous_file(tmp_path):
    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, OLD)
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env=noodle_env(),
    )
    try:
        assert writer.stdout.readline() == "written\n"
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        writer.kill()
        writer.stdout.close()

    assert target.read_bytes() == OLD
    # A kill leaves no chance to clean up: the new bytes stay in a hidden temporary file
    # beside the target, never in the target itself.
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert [p.name.startswith(".model.safetensors.") for p in leftovers] == [True]

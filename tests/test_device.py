import pytest
import torch

from noodle.device import select_device, select_dtype
from noodle.errors import NoodleError, UsageError
from tests.conftest import run_noodle


def test_backend_comes_from_the_option_then_the_environment(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("NOODLE_BACKEND", "cpu")
    assert select_device(None) == torch.device("cpu")


def test_unknown_backend_is_a_usage_error_never_a_fallback(monkeypatch):
    with pytest.raises(UsageError, match="unknown backend 'tpu'"):
        select_device("tpu")
    monkeypatch.setenv("NOODLE_BACKEND", "gpu")
    with pytest.raises(UsageError, match="unknown backend 'gpu'"):
        select_device(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_backend_is_an_error():
    with pytest.raises(NoodleError, match="no CUDA GPU is available"):
        select_device("cuda")


def test_auto_dtype_is_float32_on_cpu_and_names_are_checked():
    assert select_dtype("auto", torch.device("cpu")) == torch.float32
    assert select_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UsageError, match="unknown dtype 'half'"):
        select_dtype("half", torch.device("cpu"))


def test_several_processes_without_torchrun_are_refused_before_anything_is_written(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("once upon a time\n" * 50)
    result = run_noodle("train", corpus, tmp_path / "out", env={"WORLD_SIZE": "2"})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: WORLD_SIZE is 2 but MASTER_ADDR is not set: start the processes of a run "
        "with torchrun"
    ]
    assert not (tmp_path / "out").exists()

"""The Modal jobs in jobs/modal/, checked without a Modal account: their shape, the command
line they build, the volume paths they accept, a local run of the training job against a
temporary directory standing in for the volume, and the README's commands."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from types import ModuleType

import modal
import pytest
import typer

import noodle.cli
from noodle.checkpoint import load_model
from noodle.cloud import (
    VOLUME_NAME,
    JobVolume,
    finetune_arguments,
    noodle_command,
    print_tree,
    run_and_commit,
    train_arguments,
)
from tests.conftest import REPO, TINY_CONFIG, story_corpus

JOBS = {"train": "train_noodle", "finetune": "finetune_noodle"}  # job file -> GPU function


def load_job(name: str) -> ModuleType:
    """Import jobs/modal/NAME.py as `modal run` does: as a file, not as part of a package."""
    spec = importlib.util.spec_from_file_location(
        f"noodle_{name}_job", REPO / "jobs/modal" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jobs() -> dict[str, ModuleType]:
    return {name: load_job(name) for name in JOBS}


class Commits:
    """Stands in for `Volume.commit`, counting the calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def volume(tmp_path) -> JobVolume:
    mount = tmp_path / "data"
    mount.mkdir()
    return JobVolume(mount=mount, commit=Commits())


# --- acceptance 1: the job files import without an account -------------------------------


def test_job_files_import_without_a_modal_account(tmp_path):
    script = (
        "import importlib.util, modal\n"
        "for name in ('train', 'finetune'):\n"
        "    spec = importlib.util.spec_from_file_location(name, f'jobs/modal/{name}.py')\n"
        "    job = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(job)\n"
        "    functions = sorted(k for k, v in vars(job).items() if isinstance(v, modal.Function))\n"
        "    print(name, type(job.app).__name__, job.app.name, *functions)\n"
    )
    # No Modal config and a server address nothing listens on: any contact would fail.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MODAL_") and key != "HOME"
    }
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO), MODAL_SERVER_URL="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "train App noodle-train list_volume train_noodle",
        "finetune App noodle-finetune finetune_noodle list_volume",
    ]


@pytest.mark.parametrize("job", JOBS)
def test_gpu_functions_mount_the_volume_and_take_a_gpu_per_run(jobs, job):
    function = getattr(jobs[job], JOBS[job])
    # `--gpu` picks the GPU per run: a variant of the function, configured offline.
    variant = function.with_options(gpu="H100:8")
    assert isinstance(variant, modal.Function) and variant is not function
    options = jobs[job].resources.gpu_function_options()
    assert set(options["volumes"]) == {"/data"}
    assert options["env"] == {"NOODLE_BACKEND": "cuda"}


# --- the command line given to `noodle` ------------------------------------------------


def cli_params(arguments: list[str]) -> dict:
    """What the real `noodle` CLI parses from `arguments`, without running the command."""
    group = typer.main.get_command(noodle.cli.app)
    command = group.commands[arguments[0]]
    return command.make_context(arguments[0], arguments[1:]).params


def test_train_arguments_are_what_noodle_train_parses():
    arguments = train_arguments(
        "hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt",
        "/data/models/noodle",
        model="soba",
        max_epochs=3,
        resume=True,
        extra_args=["--batch-size", "32"],
    )
    assert arguments == [
        *("train", "hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt"),
        *("/data/models/noodle", "--model", "soba", "--max-epochs", "3", "--resume"),
        *("--batch-size", "32"),
    ]
    params = cli_params(arguments)
    assert params["corpus"] == "hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt"
    assert params["output_dir"] == Path("/data/models/noodle")
    assert (params["model"], params["max_epochs"], params["batch_size"]) == ("soba", 3, 32)
    assert params["resume"] is True
    assert (
        cli_params(train_arguments("c.txt", "out", model="somen", max_epochs=1))["resume"] is False
    )


def dolly_finetune_arguments() -> list[str]:
    return finetune_arguments(
        "/data/models/noodle",
        "/data/corpus/dolly.txt",
        "/data/models/noodle-sft",
        max_epochs=3,
        resume=True,
        extra_args=["--batch-size", "8"],
    )


def test_finetune_arguments_follow_noodle_finetune():
    assert dolly_finetune_arguments() == [
        *("finetune", "/data/models/noodle", "/data/corpus/dolly.txt", "/data/models/noodle-sft"),
        *("--max-epochs", "3", "--resume", "--batch-size", "8"),
    ]


def test_finetune_arguments_are_what_noodle_finetune_parses():
    params = cli_params(dolly_finetune_arguments())
    assert (params["max_epochs"], params["batch_size"], params["resume"]) == (3, 8, True)


def test_one_gpu_runs_the_cli_and_several_run_torchrun():
    arguments = ["train", "corpus.txt", "out"]
    single = [sys.executable, "-m", "noodle", *arguments]
    assert noodle_command(arguments, gpus=0) == single
    assert noodle_command(arguments, gpus=1) == single
    assert noodle_command(arguments, gpus=8) == [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"),
        *("-m", "noodle", *arguments),
    ]


@pytest.mark.parametrize(
    ("job", "options", "expected"),
    [
        (
            "train",
            {"gpu": "H100:8", "resume": True, "extra_args": "--batch-size 32 --lr '3e-4'"},
            {
                "corpus": "hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt",
                "model_dir": "/data/models/noodle",
                "max_epochs": 10,
                "model": "somen",
                "resume": True,
                "extra_args": ["--batch-size", "32", "--lr", "3e-4"],
            },
        ),
        (
            "finetune",
            {"input": "/data/corpus/dolly.txt", "gpu": "A100-80GB"},
            {
                "input": "/data/corpus/dolly.txt",
                "base_model_dir": "/data/models/noodle",
                "output_dir": "/data/models/noodle-sft",
                "max_epochs": 5,
                "resume": False,
                "extra_args": [],
            },
        ),
    ],
)
def test_entrypoint_runs_the_gpu_function_on_the_chosen_gpu(
    jobs, monkeypatch, job, options, expected
):
    calls = []

    class RecordingFunction:
        def with_options(self, **config):
            calls.append(("with_options", config))
            return self

        def remote(self, **kwargs):
            calls.append(("remote", kwargs))

    monkeypatch.setattr(jobs[job], JOBS[job], RecordingFunction())
    jobs[job].main.info.raw_f(**options)
    assert calls == [("with_options", {"gpu": options["gpu"]}), ("remote", expected)]


# --- paths on the volume ---------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    ["hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt", "https://example.com/a.txt"],
)
def test_remote_corpora_are_left_to_noodle(volume, source):
    volume.require_input(source, "corpus", folder="corpus")


def test_a_corpus_on_the_volume_is_accepted(volume):
    corpus = volume.mount / "corpus" / "stories.txt"
    corpus.parent.mkdir()
    corpus.write_text("once upon a time\n")
    volume.require_input(str(corpus), "corpus", folder="corpus")


def test_a_missing_corpus_says_how_to_upload_it(volume):
    missing = f"{volume.mount}/corpus/tinystories-train.txt"
    with pytest.raises(FileNotFoundError) as error:
        volume.require_input(missing, "corpus", folder="corpus")
    assert str(error.value) == (
        f"corpus not found: {missing}\n"
        "Upload it with: modal volume put noodle-data <local-file> /corpus/tinystories-train.txt"
    )


def test_a_corpus_off_the_volume_says_where_to_put_it(volume):
    with pytest.raises(FileNotFoundError) as error:
        volume.require_input("corpus/tinystories-train.txt", "corpus", folder="corpus")
    message = str(error.value)
    assert "is not on the noodle-data volume" in message
    assert (
        "modal volume put noodle-data corpus/tinystories-train.txt /corpus/tinystories-train.txt"
        in message
    )
    assert f"and pass {volume.mount}/corpus/tinystories-train.txt" in message


def test_outputs_must_be_on_the_volume(volume):
    volume.require_output(f"{volume.mount}/models/noodle", "model directory")
    for elsewhere in ("/root/models/noodle", f"{volume.mount}/../models/noodle", "models"):
        with pytest.raises(ValueError, match="would be lost when the container stops"):
            volume.require_output(elsewhere, "model directory")


def test_a_missing_base_model_says_how_to_make_one(volume):
    base = volume.mount / "models" / "noodle"
    with pytest.raises(FileNotFoundError) as error:
        volume.require_model(str(base), train_job="jobs/modal/train.py")
    assert f"modal run jobs/modal/train.py --model-dir {base}" in str(error.value)
    assert "modal volume put noodle-data <local-model-dir> /models/noodle" in str(error.value)

    base.mkdir(parents=True)
    (base / "model.json").write_text("{}")
    volume.require_model(str(base), train_job="jobs/modal/train.py")
    volume.require_model(str(base / "model.safetensors"), train_job="jobs/modal/train.py")


# --- running `noodle` and committing the volume ----------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_the_volume_is_committed_whatever_the_outcome(volume, code):
    command = [sys.executable, "-c", f"raise SystemExit({code})"]
    if code:
        with pytest.raises(RuntimeError, match=f"exited with code {code}"):
            run_and_commit(command, volume)
    else:
        run_and_commit(command, volume)
    assert volume.commit.count == 1


class Cancelled(Exception):
    """What Modal raises in a sync function whose run is cancelled (on SIGUSR1)."""


def raise_cancelled(signum: int, frame: object) -> None:
    raise Cancelled


@pytest.mark.parametrize(
    ("stop_signal", "outcome"),
    [
        (signal.SIGINT, pytest.raises(RuntimeError, match="exited with code 130")),  # pre-empted
        (signal.SIGUSR1, pytest.raises(Cancelled)),  # cancelled: Modal's handler raises
    ],
)
def test_a_stopped_job_lets_noodle_save_before_committing(volume, tmp_path, stop_signal, outcome):
    """Modal stops a job by signalling its process: `noodle` must get SIGINT and exit by
    itself (after saving its resume state), and only then is the volume committed."""
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    child = (
        "import pathlib, signal, sys, time\n"
        "def save_and_exit(signum, frame):\n"
        f"    pathlib.Path({str(saved)!r}).write_text(str(signum))\n"
        "    sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGINT, save_and_exit)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if ready.exists():
            os.kill(os.getpid(), stop_signal)

    sigint_before = signal.getsignal(signal.SIGINT)
    sigusr1_before = signal.signal(signal.SIGUSR1, raise_cancelled)
    try:
        threading.Thread(target=stop_when_ready, daemon=True).start()
        with outcome:
            run_and_commit([sys.executable, "-c", child], volume)
    finally:
        signal.signal(signal.SIGUSR1, sigusr1_before)
    assert saved.read_text() == str(int(signal.SIGINT))
    assert volume.commit.count == 1
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_a_missing_corpus_stops_the_train_job_before_it_runs(jobs, volume, monkeypatch):
    monkeypatch.setattr(jobs["train"], "volume", volume)
    with (
        pytest.warns(UserWarning, match="executing locally"),
        pytest.raises(FileNotFoundError, match="modal volume put noodle-data"),
    ):
        jobs["train"].train_noodle.local(
            corpus=f"{volume.mount}/corpus/missing.txt", model_dir=f"{volume.mount}/models/noodle"
        )
    assert volume.commit.count == 0


def test_a_missing_base_model_stops_the_finetune_job_before_it_runs(jobs, volume, monkeypatch):
    monkeypatch.setattr(jobs["finetune"], "volume", volume)
    with (
        pytest.warns(UserWarning, match="executing locally"),
        pytest.raises(FileNotFoundError, match="Train one with"),
    ):
        jobs["finetune"].finetune_noodle.local(
            input="hf://databricks/databricks-dolly-15k/databricks-dolly-15k.jsonl",
            base_model_dir=f"{volume.mount}/models/noodle",
            output_dir=f"{volume.mount}/models/noodle-sft",
        )
    assert volume.commit.count == 0


# --- acceptance 2: the training job, run locally into a temporary "volume" ---------------


def test_train_job_trains_a_model_into_the_volume(
    jobs, volume, monkeypatch, capfd, tiny_tokenizer, one_torch_thread
):
    corpus = volume.mount / "corpus" / "stories.txt"
    corpus.parent.mkdir()
    corpus.write_text(story_corpus(100))
    config = volume.mount / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    model_dir = volume.mount / "models" / "noodle"
    monkeypatch.setattr(jobs["train"], "volume", volume)
    monkeypatch.setenv("NOODLE_BACKEND", "cpu")  # what the Modal function sets to cuda
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child `python -m noodle` is this checkout

    with pytest.warns(UserWarning, match="executing locally"):  # the very Modal function
        jobs["train"].train_noodle.local(
            corpus=str(corpus),
            model_dir=str(model_dir),
            max_epochs=1,
            model=str(config),
            # A few small steps of a small vocabulary: what is checked here is the job, not
            # learning.
            extra_args=[
                *("--max-steps", "4", "--batch-size", "2", "--eval-batches", "1"),
                *("--tokenizer", str(tiny_tokenizer)),
            ],
        )

    assert volume.commit.count == 1
    out = capfd.readouterr().out
    assert "Running: " in out and " -m noodle train " in out
    assert "modal volume get noodle-data /models/noodle models/" in out
    metadata = json.loads((model_dir / "model.json").read_text())
    assert metadata["training"]["status"] == "finished"
    assert metadata["training"]["steps"] == 4
    loaded = load_model(model_dir)
    assert loaded.config.n_layers == TINY_CONFIG["n_layers"]

    # The model it left answers (the CLI's entry point, in this process).
    with pytest.raises(SystemExit) as exit_info:
        noodle.cli.main(
            [
                *("chat", str(model_dir), "--prompt", "once upon a time"),
                *("--temperature", "0", "--max-tokens", "8"),
            ]
        )
    reply = capfd.readouterr()
    assert exit_info.value.code == 0, reply.err
    assert reply.out.strip()


def test_list_volume_prints_the_tree_with_sizes(jobs, tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "stories.txt").write_bytes(b"x" * 10)
    model = tmp_path / "models" / "noodle"
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    (model / "model.safetensors").write_bytes(bytes(3 * 1024 * 1024 // 2))
    with pytest.warns(UserWarning, match="executing locally"):
        jobs["train"].list_volume.local(str(tmp_path))
    assert capsys.readouterr().out == (
        f"{tmp_path}/\n"
        "  corpus/\n"
        "    stories.txt (10B)\n"
        "  models/\n"
        "    noodle/\n"
        "      model.json (2B)\n"
        "      model.safetensors (1.5MB)\n"
        "3 files, 1.5MB\n"
    )


def test_print_tree_of_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        print_tree(tmp_path / "nothing")


# --- acceptance 3: the README's commands match the jobs' parameters ---------------------


def readme_commands(prefix: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [
        shlex.split(line.strip(), comments=True)
        for line in text.splitlines()
        if line.strip().startswith(prefix)
    ]


class EntrypointOption(typing.NamedTuple):
    parameter: inspect.Parameter
    takes_value: bool


def entrypoint_options(job: ModuleType) -> dict[str, EntrypointOption]:
    """`modal run`'s options for the job's local entrypoint: one per parameter, with dashes,
    and --no-NAME for booleans (as modal builds them)."""
    function = job.main.info.raw_f
    hints = typing.get_type_hints(function)
    options = {}
    for parameter in inspect.signature(function).parameters.values():
        name = parameter.name.replace("_", "-")
        is_flag = hints[parameter.name] is bool
        options[f"--{name}"] = EntrypointOption(parameter, takes_value=not is_flag)
        if is_flag:
            options[f"--no-{name}"] = EntrypointOption(parameter, takes_value=False)
    return options


def test_readme_modal_run_commands_match_the_entrypoints(jobs):
    commands = readme_commands("modal run ")
    assert {tuple(command[:3]) for command in commands} >= {
        ("modal", "run", "jobs/modal/train.py"),
        ("modal", "run", "jobs/modal/finetune.py"),
        ("modal", "run", "jobs/modal/train.py::list_volume"),
    }
    for command in commands:
        path, _, function = command[2].partition("::")
        job = jobs[Path(path).stem]
        arguments = command[3:]
        if function:
            assert isinstance(getattr(job, function), modal.Function), command
            assert not arguments, f"{command}: options of ::{function} are not checked here"
            continue
        options = entrypoint_options(job)
        given = set()
        while arguments:
            option = arguments.pop(0)
            assert option in options, f"{shlex.join(command)}: no option {option}"
            given.add(options[option].parameter.name)
            if options[option].takes_value:
                arguments.pop(0)
        required = {
            o.parameter.name for o in options.values() if o.parameter.default is o.parameter.empty
        }
        assert required <= given, f"{shlex.join(command)}: missing {required - given}"


def test_readme_option_tables_list_every_entrypoint_option_with_its_default(jobs):
    text = (REPO / "README.md").read_text()
    for name, job in jobs.items():
        row = next(
            line for line in text.splitlines() if line.startswith(f"| `jobs/modal/{name}.py`")
        )
        documented = dict(re.findall(r"`(--[a-z-]+)`(?: \(`([^`]*)`\))?", row))
        parameters = {
            option: entry.parameter
            for option, entry in entrypoint_options(job).items()
            if not option.startswith("--no-")
        }
        assert set(documented) == set(parameters), row
        for option, default in documented.items():
            if default:
                assert default == str(parameters[option].default), option


def test_readme_volume_commands_name_the_jobs_volume():
    commands = readme_commands("modal volume ")
    assert {command[2] for command in commands} >= {"put", "get"}
    assert all(command[3] == VOLUME_NAME for command in commands)

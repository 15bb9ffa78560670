"""What the Modal jobs in jobs/modal/ share: the volume, the image, checking paths on the
volume, building the `noodle` command line, running it and committing the volume.

The jobs run the very same `noodle` command as a local user does; this module only prepares
and launches it. It imports `modal` only inside the functions that build Modal objects, so
the package works without the `modal` extra and the rest is testable without an account.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import modal

VOLUME_NAME = "noodle-data"
VOLUME_MOUNT = "/data"
DEFAULT_GPU = "H100"
# Modal's longest function timeout: a full TinyStories run takes hours.
JOB_TIMEOUT_S = 24 * 60 * 60
REMOTE_SOURCES = ("hf://", "http://", "https://")
MODEL_JSON = "model.json"
MODEL_FILES = (MODEL_JSON, "model.safetensors")  # what MODEL may name inside a model directory

IMAGE_PYTHON = "3.12"
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
# What `pip install` needs from the checkout: the package and the files its metadata names.
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "LICENSE.md", "noodle/**/*.py", "noodle/assets")
SOURCE_IN_IMAGE = "/opt/noodle-src"


@dataclass(frozen=True)
class JobVolume:
    """The volume as a job sees it: where it is mounted and how its writes are persisted.

    On Modal that is `/data` and `Volume.commit`; tests use a temporary directory.
    """

    mount: Path
    commit: Callable[[], None]
    name: str = VOLUME_NAME

    def volume_path(self, path: str) -> PurePosixPath | None:
        """`path` as `modal volume put/get` name it (from the volume's root), or None when
        `path` is not on the volume."""
        try:
            inside = Path(os.path.abspath(path)).relative_to(self.mount)
        except ValueError:
            return None
        return PurePosixPath("/", *inside.parts)

    def require_input(self, path: str, what: str, folder: str) -> None:
        """An input file must be on the volume; hf:// and http(s):// sources are streamed by
        `noodle` itself. `folder` is where on the volume the upload hint suggests putting it."""
        if path.startswith(REMOTE_SOURCES):
            return
        inside = self.volume_path(path)
        if inside is not None and Path(path).is_file():
            return
        if inside is None:
            suggested = PurePosixPath("/", folder, PurePosixPath(path).name)
            raise FileNotFoundError(
                f"{what} {path} is not on the {self.name} volume, which the job sees at "
                f"{self.mount}. Upload it with:\n"
                f"  modal volume put {self.name} {path} {suggested}\n"
                f"and pass {self.mount}{suggested}"
            )
        raise FileNotFoundError(
            f"{what} not found: {path}\n"
            f"Upload it with: modal volume put {self.name} <local-file> {inside}"
        )

    def require_model(self, path: str, train_job: str) -> None:
        """A base model: a model directory on the volume (or a model file inside one)."""
        directory = Path(path)
        if directory.name in MODEL_FILES:
            directory = directory.parent
        inside = self.volume_path(str(directory))
        if inside is not None and (directory / MODEL_JSON).is_file():
            return
        where = (
            f"not on the {self.name} volume, which the job sees at {self.mount}"
            if inside is None
            else "not found"
        )
        remote = inside or PurePosixPath("/models", directory.name)
        raise FileNotFoundError(
            f"base model {path}: {where}. Train one with:\n"
            f"  modal run {train_job} --model-dir {self.mount}{remote}\n"
            f"or upload a model directory with:\n"
            f"  modal volume put {self.name} <local-model-dir> {remote}"
        )

    def require_output(self, path: str, what: str) -> None:
        """Outputs must be written to the volume: the container's own disk is gone when it
        stops."""
        if self.volume_path(path) is None:
            raise ValueError(
                f"{what} {path} is not on the {self.name} volume: it would be lost when the "
                f"container stops. Use a path under {self.mount}/, e.g. {self.mount}/models/noodle"
            )


def job_flags(max_epochs: int, resume: bool, extra_args: Sequence[str]) -> list[str]:
    """The options every job passes on to its `noodle` command."""
    return ["--max-epochs", str(max_epochs), *(["--resume"] if resume else []), *extra_args]


def train_arguments(
    corpus: str,
    model_dir: str,
    *,
    model: str,
    max_epochs: int,
    resume: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`noodle train`'s arguments for a training job."""
    return [
        "train",
        corpus,
        model_dir,
        "--model",
        model,
        *job_flags(max_epochs, resume, extra_args),
    ]


def finetune_arguments(
    base_model: str,
    instructions: str,
    output_dir: str,
    *,
    max_epochs: int,
    resume: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`noodle finetune`'s arguments for a fine-tuning job."""
    return [
        "finetune",
        base_model,
        instructions,
        output_dir,
        *job_flags(max_epochs, resume, extra_args),
    ]


def noodle_command(arguments: Sequence[str], gpus: int) -> list[str]:
    """The process that runs `noodle ARGUMENTS`: the CLI itself on one GPU (or none), torchrun
    with one process per GPU on several."""
    if gpus <= 1:
        return [sys.executable, "-m", "noodle", *arguments]
    return [
        *(sys.executable, "-m", "torch.distributed.run"),  # torchrun, from this interpreter
        *("--standalone", f"--nproc_per_node={gpus}"),
        *("-m", "noodle", *arguments),
    ]


def gpu_count() -> int:
    import torch  # here, not at the top: the local side of a job never needs it

    return torch.cuda.device_count()


def run_forwarding_signals(command: Sequence[str]) -> int:
    """Run `command` to its end and return its exit code.

    Modal pre-empts a container by signalling the function's own process. The default
    reaction (KeyboardInterrupt) would kill the child mid-step; passing SIGINT/SIGTERM on
    instead lets `noodle` save its resume state and exit by itself. The child gets a session
    of its own so that a signal sent to the whole process group reaches it once, not twice
    (a second one interrupts at once, without saving).
    """
    process: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        if process is not None:
            process.send_signal(signum)

    # Installed before the child starts, so that no signal falls between the two.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        process = subprocess.Popen(list(command), start_new_session=True)
        return process.wait()
    except BaseException:
        # Stopped some other way (Modal raises InputCancellation when the run is cancelled):
        # the child still gets to save and stop, as on a signal, before this goes on.
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_and_commit(command: Sequence[str], volume: JobVolume) -> None:
    """Run `command`, then commit the volume whatever happened: a failed or pre-empted run
    keeps what it saved (its resume state included) for a rerun with --resume."""
    print(f"Running: {shlex.join(command)}", flush=True)
    try:
        code = run_forwarding_signals(command)
    finally:
        volume.commit()
    if code != 0:
        raise RuntimeError(
            f"`noodle` exited with code {code} (its error is in the log above); what it saved "
            f"is committed to the {volume.name} volume"
        )


def run_noodle_job(arguments: Sequence[str], volume: JobVolume, output_dir: str) -> None:
    """Run `noodle ARGUMENTS` on every GPU of the container, commit the volume, and say how to
    download the result."""
    run_and_commit(noodle_command(arguments, gpu_count()), volume)
    remote = volume.volume_path(output_dir)
    print(
        f"Model saved to {output_dir}. Download it with:\n"
        f"  mkdir -p models && modal volume get {volume.name} {remote} models/"
    )


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{size}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TB"


def print_tree(root: Path, out: TextIO | None = None) -> None:
    """Print the folders and files under `root`, indented by depth, with each file's size."""
    out = out or sys.stdout
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    print(f"{root}/", file=out)
    total = count = 0
    for directory, folders, files in os.walk(root):
        folders.sort()
        depth = len(Path(directory).relative_to(root).parts)
        if depth:
            print(f"{'  ' * depth}{Path(directory).name}/", file=out)
        for name in sorted(files):
            size = (Path(directory) / name).stat().st_size
            total, count = total + size, count + 1
            print(f"{'  ' * (depth + 1)}{name} ({human_size(size)})", file=out)
    print(f"{count} files, {human_size(total)}", file=out)


@dataclass(frozen=True)
class ModalResources:
    """The Modal objects both jobs use: the image and the volume."""

    image: modal.Image
    volume: modal.Volume

    def job_volume(self) -> JobVolume:
        return JobVolume(mount=Path(VOLUME_MOUNT), commit=self.volume.commit)

    def gpu_function_options(self) -> dict[str, Any]:
        """`app.function` options of a job that runs `noodle` on a GPU."""
        return {
            "image": self.image,
            "gpu": DEFAULT_GPU,
            "volumes": {VOLUME_MOUNT: self.volume},
            "timeout": JOB_TIMEOUT_S,
            # A container without a working GPU fails at once instead of training on its CPU.
            "env": {"NOODLE_BACKEND": "cuda"},
        }

    def volume_function_options(self) -> dict[str, Any]:
        """`app.function` options of a function that only reads the volume."""
        return {"image": self.image, "volumes": {VOLUME_MOUNT: self.volume}}


def modal_resources(job_file: str) -> ModalResources:
    """The image and volume for the job defined in `job_file` (jobs/modal/NAME.py).

    The image installs the package from the checkout that holds `job_file`. Inside the
    container the job file sits at /root/NAME.py and the image is only referred to, never
    built, so the path it computes there is unused.
    """
    import modal

    checkout = Path(job_file).resolve().parent.parent.parent
    image = (
        modal.Image.debian_slim(python_version=IMAGE_PYTHON)
        # The CUDA build first: the package's own `torch` requirement is then already met.
        .pip_install("torch", index_url=CUDA_TORCH_INDEX)
        # The other dependencies get a layer of their own, so editing the code (the layers
        # below) does not reinstall them.
        .pip_install_from_pyproject(str(checkout / "pyproject.toml"))
        .add_local_dir(
            checkout,
            SOURCE_IN_IMAGE,
            copy=True,
            ignore=~modal.FilePatternMatcher(*PACKAGE_SOURCES),
        )
        .run_commands(f"pip install --no-deps {SOURCE_IN_IMAGE}")
    )
    volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
    return ModalResources(image=image, volume=volume)

"""Train Noodle on a Modal cloud GPU, with the `noodle train` command itself.

    modal run jobs/modal/train.py --max-epochs 20                # TinyStories, streamed
    modal run jobs/modal/train.py --corpus /data/corpus/my.txt   # a file on the volume
    modal run jobs/modal/train.py --gpu H100:8                   # torchrun over 8 GPUs
    modal run jobs/modal/train.py --resume                       # continue an interrupted run
    modal run jobs/modal/train.py::list_volume                   # what the volume holds

The model is written to the `noodle-data` volume (mounted at /data); README.md's "Cloud
GPUs on Modal" section has the whole workflow.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import modal

from noodle.cloud import (
    DEFAULT_GPU,
    VOLUME_MOUNT,
    modal_resources,
    print_tree,
    run_noodle_job,
    train_arguments,
)

TINYSTORIES_TRAIN = "hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt"
DEFAULT_MODEL_DIR = f"{VOLUME_MOUNT}/models/noodle"

app = modal.App("noodle-train")
resources = modal_resources(__file__)
volume = resources.job_volume()


@app.function(**resources.gpu_function_options())
def train_noodle(
    corpus: str,
    model_dir: str = DEFAULT_MODEL_DIR,
    max_epochs: int = 10,
    model: str = "somen",
    resume: bool = False,
    extra_args: Sequence[str] = (),
) -> None:
    """Run `noodle train CORPUS MODEL_DIR` on every GPU of the container.

    `extra_args` are further `noodle train` options, e.g. ["--batch-size", "32"].
    """
    volume.require_input(corpus, "corpus", folder="corpus")
    volume.require_output(model_dir, "model directory")
    arguments = train_arguments(
        corpus, model_dir, model=model, max_epochs=max_epochs, resume=resume, extra_args=extra_args
    )
    run_noodle_job(arguments, volume, model_dir)


@app.function(**resources.volume_function_options())
def list_volume(path: str = VOLUME_MOUNT) -> None:
    """Print the volume's folders and files with their sizes."""
    print_tree(Path(path))


@app.local_entrypoint()
def main(
    corpus: str = TINYSTORIES_TRAIN,
    max_epochs: int = 10,
    model: str = "somen",
    model_dir: str = DEFAULT_MODEL_DIR,
    gpu: str = DEFAULT_GPU,
    resume: bool = False,
    extra_args: str = "",
) -> None:
    """Train Noodle on a Modal GPU.

    Args:
        corpus: an hf://owner/repo/file spec or http(s):// URL (streamed), or a file on the
            volume such as /data/corpus/tinystories-train.txt.
        max_epochs: passes over the training split.
        model: preset (somen, soba, udon) or a CONFIG.json on the volume.
        model_dir: where on the volume the model is written.
        gpu: Modal GPU type, with a count for several: H100, A100-80GB, H100:8.
        resume: continue the interrupted run in model_dir.
        extra_args: further `noodle train` options, e.g. "--batch-size 32 --lr 3e-4".
    """
    train_noodle.with_options(gpu=gpu).remote(
        corpus=corpus,
        model_dir=model_dir,
        max_epochs=max_epochs,
        model=model,
        resume=resume,
        extra_args=shlex.split(extra_args),
    )

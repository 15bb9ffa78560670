"""Fine-tune a Noodle model on instruction data on a Modal cloud GPU, with the
`noodle finetune` command itself.

    modal volume put noodle-data corpus/dolly.txt /corpus/dolly.txt
    modal run jobs/modal/finetune.py --input /data/corpus/dolly.txt --max-epochs 3

The base model (default /data/models/noodle, what jobs/modal/train.py writes) and the
output directory are on the `noodle-data` volume; README.md's "Cloud GPUs on Modal"
section has the whole workflow.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import modal

from noodle.cloud import (
    DEFAULT_GPU,
    VOLUME_MOUNT,
    finetune_arguments,
    modal_resources,
    print_tree,
    run_noodle_job,
)

DEFAULT_BASE_MODEL_DIR = f"{VOLUME_MOUNT}/models/noodle"
DEFAULT_OUTPUT_DIR = f"{VOLUME_MOUNT}/models/noodle-sft"

app = modal.App("noodle-finetune")
resources = modal_resources(__file__)
volume = resources.job_volume()


@app.function(**resources.gpu_function_options())
def finetune_noodle(
    input: str,
    base_model_dir: str = DEFAULT_BASE_MODEL_DIR,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    max_epochs: int = 5,
    resume: bool = False,
    extra_args: Sequence[str] = (),
) -> None:
    """Run `noodle finetune BASE_MODEL_DIR INPUT OUTPUT_DIR` on every GPU of the container.

    `extra_args` are further `noodle finetune` options, e.g. ["--batch-size", "8"].
    """
    volume.require_model(base_model_dir, train_job="jobs/modal/train.py")
    volume.require_input(input, "instruction file", folder="corpus")
    volume.require_output(output_dir, "output directory")
    arguments = finetune_arguments(
        base_model_dir,
        input,
        output_dir,
        max_epochs=max_epochs,
        resume=resume,
        extra_args=extra_args,
    )
    run_noodle_job(arguments, volume, output_dir)


@app.function(**resources.volume_function_options())
def list_volume(path: str = VOLUME_MOUNT) -> None:
    """Print the volume's folders and files with their sizes."""
    print_tree(Path(path))


@app.local_entrypoint()
def main(
    input: str,
    base_model_dir: str = DEFAULT_BASE_MODEL_DIR,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    max_epochs: int = 5,
    gpu: str = DEFAULT_GPU,
    resume: bool = False,
    extra_args: str = "",
) -> None:
    """Fine-tune a Noodle model on a Modal GPU.

    Args:
        input: the instruction file: an hf://owner/repo/file spec or http(s):// URL
            (streamed), or a file on the volume such as /data/corpus/dolly.txt.
        base_model_dir: the model to start from, on the volume.
        output_dir: where on the volume the fine-tuned model is written.
        max_epochs: passes over the instruction data.
        gpu: Modal GPU type, with a count for several: H100, A100-80GB, H100:8.
        resume: continue the interrupted run in output_dir.
        extra_args: further `noodle finetune` options, e.g. "--batch-size 8 --lr 1e-5".
    """
    finetune_noodle.with_options(gpu=gpu).remote(
        input=input,
        base_model_dir=base_model_dir,
        output_dir=output_dir,
        max_epochs=max_epochs,
        resume=resume,
        extra_args=shlex.split(extra_args),
    )

"""The model directory: model.json, model.safetensors, tokenizer.json, metrics.jsonl and the
resume state, each written atomically so a crash leaves the old file or the new one."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from noodle import __version__
from noodle.config import ModelConfig, config_from_dict, read_json_file
from noodle.errors import NoodleError
from noodle.files import atomic_write, atomic_write_bytes, atomic_write_json
from noodle.model import NoodleModel, weight_shapes
from noodle.tokenizer import TextTokenizer, load_tokenizer

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
RESUME = "resume.safetensors"
# A LoRA run's adapters alone, beside the merged weights (see noodle.lora).
ADAPTERS = "adapters.safetensors"

# The safetensors names of the dtypes a checkpoint can hold.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def unwrap(model: torch.nn.Module) -> NoodleModel:
    """The plain model under torch.compile and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            return model


def write_safetensors(
    handle: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write contiguous CPU `tensors` to `handle` in the safetensors format, each straight
    from its own memory.

    safetensors.torch.save builds the whole file in memory first (a second copy of the
    resume state, which holds the model three times over), and safetensors.torch.save_file
    (0.8) writes its own temporary file and renames it over the name it is given, with mode
    0600, so it cannot fill the temporary file of `atomic_write`.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        end = offset + tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to align the data
    handle.write(len(encoded).to_bytes(8, "little"))
    handle.write(encoded)
    for tensor in tensors.values():
        handle.write(tensor.reshape(-1).view(torch.uint8).numpy())


# A safetensors header is JSON of a few hundred bytes per tensor; more than this is damage.
MAX_HEADER_BYTES = 100 << 20


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked to describe exactly the data the file
    holds, read without mapping the file (a mapping as large as a big model's weights can
    be refused by the kernel on a machine with less memory)."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError("not a safetensors file: no header")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: its header is not a JSON object")
    try:
        end = max(
            (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
            default=0,
        )
    except (KeyError, IndexError, TypeError):
        raise ValueError("not a safetensors file: a tensor without data offsets") from None
    if end != size - 8 - length:
        raise ValueError(
            f"data not fully covered: the header describes {end:,} bytes of data, the file "
            f"holds {size - 8 - length:,}"
        )
    return header


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_metadata(
    config: ModelConfig, preset: str, tokenizer: TextTokenizer, training: dict
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        **config.to_dict(),
        "preset": preset,
        "parameters": config.parameter_count(),
        "tokenizer": {"file": TOKENIZER, **tokenizer.identity()},
        "training": {**training, "noodle_version": __version__, "date": utc_now()},
    }


def check_output_dir(path: str | Path) -> Path:
    """OUTPUT_DIR as a Path, refused if it names an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NoodleError(f"output directory {path} is a file")
    return path


@dataclass(frozen=True)
class BestWeights:
    """The evaluation whose weights are saved as the model's: its step and validation loss."""

    step: int
    val_loss: float


def best_metadata(best: BestWeights | None) -> dict[str, str]:
    """A weights file's record of the evaluation its weights are the best of, if any (see
    `ModelDir.read_best_weights`)."""
    if best is None:
        return {}
    return {"best_step": str(best.step), "best_val_loss": repr(best.val_loss)}


class ModelDir:
    """Writes one model directory. Creating it fails cleanly if the path is a file."""

    def __init__(self, path: str | Path) -> None:
        self.path = check_output_dir(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NoodleError(f"cannot create output directory {self.path}: {exc}") from None

    def file(self, name: str) -> Path:
        return self.path / name

    def write_metadata(self, metadata: dict) -> None:
        atomic_write_json(self.file(MODEL_JSON), metadata)

    def write_tokenizer(self, tokenizer: TextTokenizer) -> None:
        atomic_write_bytes(self.file(TOKENIZER), tokenizer.raw)

    def write_weights(
        self, tensors: dict[str, torch.Tensor], best: BestWeights | None = None
    ) -> None:
        """Write contiguous CPU `tensors` (a state dict) as the model's weights, with which
        evaluation of a run they are the best of, if any (see `read_best_weights`)."""
        metadata = best_metadata(best)
        atomic_write(
            self.file(WEIGHTS), lambda handle: write_safetensors(handle, tensors, metadata)
        )

    def read_best_weights(self) -> BestWeights | None:
        """Which evaluation the weights on disk are the best of, from their own file (so it
        holds even if a crash came between writing them and model.json); None without
        weights or that record."""
        try:
            metadata = read_safetensors_header(self.file(WEIGHTS))["__metadata__"]
            return BestWeights(int(metadata["best_step"]), float(metadata["best_val_loss"]))
        except (OSError, KeyError, TypeError, ValueError):
            return None

    def remove_temporary_files(self) -> None:
        """Delete what writes killed mid-way (SIGKILL, power cut) left behind; call only when
        no other process writes this directory, e.g. when resuming its run."""
        for name in (MODEL_JSON, WEIGHTS, TOKENIZER, METRICS, RESUME, ADAPTERS):
            for leftover in self.path.glob(f".{name}.*.tmp"):
                leftover.unlink(missing_ok=True)

    def save_resume_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Tensors and JSON state in one safetensors file, so they can never disagree."""
        metadata = {"state": json.dumps(state)}
        atomic_write(self.file(RESUME), lambda handle: write_safetensors(handle, tensors, metadata))

    def read_resume_metadata(self) -> dict:
        """The JSON part of the resume state alone, without reading its tensors."""
        return self.open_resume_state()[1]

    def open_resume_state(self) -> tuple[SavedTensors, dict]:
        """The resume state's tensors (each read when asked for) and its JSON part."""
        return open_resume_state(self.file(RESUME))


class SavedTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file by name, each read when asked for: the whole file
    is never in memory at once, and a process given a shard of a model can leave the rest
    unread. safetensors holds raw tensor data and a JSON header: nothing is unpickled."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        try:
            self.reader = safe_open(path, framework="pt")
            self.names = list(self.reader.keys())
        except (SafetensorError, OSError) as exc:
            raise self.error(exc) from None

    def error(self, exc: Exception) -> NoodleError:
        return NoodleError(f"{self.path}: {self.problem} ({exc})")

    def metadata(self) -> dict[str, str] | None:
        return self.reader.metadata()

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header alone."""
        return tuple(self.reader.get_slice(name).get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        try:
            return self.reader.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise self.error(exc) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def open_resume_state(path: Path) -> tuple[SavedTensors, dict]:
    """The tensors (each read when asked for) and the JSON part of the resume state `path`."""
    if not path.is_file():
        raise NoodleError(f"nothing to resume: {path} does not exist (start without --resume)")
    tensors = SavedTensors(path, "corrupt resume state")
    try:
        state = json.loads(tensors.metadata()["state"])
    except (KeyError, TypeError, ValueError) as exc:
        raise NoodleError(f"{path}: corrupt resume state ({exc})") from None
    return tensors, state


@dataclass
class LoadedModel:
    model: NoodleModel
    config: ModelConfig
    tokenizer: TextTokenizer
    metadata: dict
    directory: Path


@dataclass
class ModelFiles:
    """A model directory checked without reading its weights' data: model.json holds a valid
    architecture, the weights file's header matches it, and the tokenizer loads and fits it."""

    directory: Path
    metadata: dict
    config: ModelConfig
    tokenizer: TextTokenizer


def run_status(training: dict) -> str:
    """The status of the run that made a model, as its training summary records it, in
    words: "finished at step 900", "interrupted at step 37", ..."""
    status, steps = training.get("status"), training.get("steps")
    at = f" at step {steps:,}" if isinstance(steps, int) else ""
    if status == "training":
        # model.json is rewritten at each new best and at the end: a killed run stays here.
        return f"training (or killed; last recorded{at})"
    return f"{status}{at}" if isinstance(status, str) else "unknown"


def weights_description(training: dict) -> str:
    """Which weights model.safetensors holds, as the training summary records it."""
    step = training.get("weights_step") or training.get("best_step")
    if training.get("weights") == "unevaluated":
        return f"the weights of step {step:,}, saved when the run stopped before any evaluation"
    loss = training.get("best_val_loss")
    if isinstance(loss, (int, float)) and isinstance(step, int):
        return f"the best weights so far (step {step:,}, validation loss {loss:.4f})"
    return "the saved weights"


def unfinished_run_warning(directory: Path, metadata: dict) -> str | None:
    """For chat and eval: a warning when the weights come from a run that did not finish."""
    training = metadata.get("training")
    if not isinstance(training, dict) or training.get("status") in (None, "finished"):
        return None
    return (
        f"{directory}: the run is not finished, it is {run_status(training)}; these are "
        f"{weights_description(training)}"
    )


def model_directory(spec: str | Path) -> Path:
    """A model directory from MODEL: the directory itself or a file inside it."""
    path = Path(spec)
    if path.is_file() and path.name in (MODEL_JSON, WEIGHTS):
        path = path.parent
    if not path.exists():
        raise NoodleError(f"model {spec}: no such directory")
    if not path.is_dir():
        raise NoodleError(f"model {spec}: expected a model directory, model.json or {WEIGHTS}")
    if not (path / MODEL_JSON).is_file():
        raise NoodleError(f"model {spec}: {MODEL_JSON} is missing from {path}")
    if not (path / WEIGHTS).is_file():
        raise NoodleError(f"model {spec}: {WEIGHTS} is missing from {path}{why_no_weights(path)}")
    return path


def why_no_weights(directory: Path) -> str:
    """Why a directory has no weights, when model.json tells: its run has saved none yet."""
    try:
        training = json.loads((directory / MODEL_JSON).read_text(encoding="utf-8"))["training"]
        status, best_step = training["status"], training.get("best_step")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if best_step or status == "finished":
        return ""
    if status == "training":
        return (
            " (its run is still training, or was killed; it writes its first weights at its "
            "first evaluation)"
        )
    return f" (its run was {run_status(training)}, before its first evaluation)"


def model_tokenizer(directory: Path, metadata: dict, spec: str | Path) -> TextTokenizer:
    """The directory's tokenizer.json. Only a model.json that names no tokenizer file (one
    written by hand) falls back to the bundled tokenizer: for any other, that fallback would
    be the wrong tokenizer."""
    path = directory / TOKENIZER
    if path.is_file():
        return load_tokenizer(path)
    recorded = metadata.get("tokenizer")
    if isinstance(recorded, dict) and recorded.get("file"):
        raise NoodleError(f"model {spec}: {TOKENIZER} is missing from {directory}")
    return load_tokenizer()


def check_weights_match(path: Path, config: ModelConfig, spec: str | Path) -> None:
    """Refuse a weights file that is unreadable or whose tensors are not those of `config`.
    Reads the file's header only (see `read_safetensors_header`), and walks the config's
    tensors no further than the file's: a model.json that names a billion layers costs no
    more to check than one that names two."""
    try:
        header = read_safetensors_header(path)
        shapes = {
            name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NoodleError(f"model {spec}: unreadable weights ({exc})") from None
    expected = set()
    for name, shape in weight_shapes(config):
        if name not in shapes:
            detail = f"missing {name}"
            break
        if shapes[name] != shape:
            detail = f"{name} is {shapes[name]}, expected {shape}"
            break
        expected.add(name)
    else:
        unexpected = [name for name in shapes if name not in expected]
        if not unexpected:
            return
        detail = f"unexpected {unexpected[0]}"
    raise NoodleError(f"model {spec}: weights do not match model.json ({detail})")


def check_format_version(metadata: object, path: Path) -> None:
    """Refuse a model.json written by a newer noodle, whose layout this one may misread."""
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise NoodleError(
            f"{path}: format version {version} is newer than this noodle ({__version__}) reads "
            f"(version {FORMAT_VERSION}); upgrade noodle to use this model"
        )


def open_model_dir(spec: str | Path) -> ModelFiles:
    """Check a model directory (MODEL) as far as possible without reading its weights."""
    directory = model_directory(spec)
    metadata = read_json_file(directory / MODEL_JSON)
    check_format_version(metadata, directory / MODEL_JSON)
    config, _ = config_from_dict(metadata, str(directory / MODEL_JSON))
    tokenizer = model_tokenizer(directory, metadata, spec)
    if tokenizer.vocab_size > config.vocab_size:
        raise NoodleError(
            f"model {spec}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}"
        )
    check_weights_match(directory / WEIGHTS, config, spec)
    return ModelFiles(directory, metadata, config, tokenizer)


def weights_sha256(files: ModelFiles) -> str:
    """The SHA-256 of a checked directory's weights file (about a second per GB)."""
    try:
        with (files.directory / WEIGHTS).open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise NoodleError(f"model {files.directory}: unreadable weights ({exc})") from None


def load_weights(files: ModelFiles, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of a checked directory (see `open_model_dir`); never executes pickled code."""
    try:
        # Tensors read from the mapped file: no second copy of the whole file in memory.
        weights = load_file(files.directory / WEIGHTS)
    except (SafetensorError, OSError) as exc:
        raise NoodleError(f"model {files.directory}: unreadable weights ({exc})") from None
    model = NoodleModel(files.config)
    model.load_state_dict(weights)
    del weights
    model.to(device).eval()
    return LoadedModel(model, files.config, files.tokenizer, files.metadata, files.directory)


def load_model(spec: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a model directory; never executes pickled code."""
    return load_weights(open_model_dir(spec), device)

"""The model directory: model.json, model.safetensors, tokenizer.json, metrics.jsonl and the
resume state, each written atomically so a crash leaves the old file or the new one."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from noodle import __version__
from noodle.config import ModelConfig, config_from_dict, read_json_file
from noodle.errors import NoodleError
from noodle.model import NoodleModel
from noodle.tokenizer import TextTokenizer, load_tokenizer

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
RESUME = "resume.safetensors"

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def unwrap(model: torch.nn.Module) -> NoodleModel:
    """The plain model under torch.compile and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            return model


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}


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


class ModelDir:
    """Writes one model directory. Creating it fails cleanly if the path is a file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NoodleError(f"output directory {self.path} is a file")
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

    def save_weights(self, model: torch.nn.Module) -> None:
        atomic_write_bytes(self.file(WEIGHTS), save_safetensors(state_tensors(model)))

    def append_metrics(self, records: list[dict]) -> None:
        """Rewrite metrics.jsonl with `records` appended, atomically."""
        if not records:
            return
        path = self.file(METRICS)
        old = path.read_bytes() if path.exists() else b""
        new = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
        atomic_write_bytes(path, old + new)

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records logged after `last_step`, e.g. past the resume point of a crash."""
        path = self.file(METRICS)
        if not path.exists():
            return
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step
        ]
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))

    def save_resume_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Tensors and JSON state in one safetensors file, so they can never disagree."""
        data = save_safetensors(tensors, metadata={"state": json.dumps(state)})
        atomic_write_bytes(self.file(RESUME), data)

    def load_resume_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        path = self.file(RESUME)
        if not path.exists():
            raise NoodleError(f"nothing to resume: {path} does not exist")
        data = path.read_bytes()
        try:
            tensors = load_safetensors(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            state = json.loads(header["__metadata__"]["state"])
        except (SafetensorError, KeyError, ValueError) as exc:
            raise NoodleError(f"{path}: corrupt resume state ({exc})") from None
        return tensors, state


@dataclass
class LoadedModel:
    model: NoodleModel
    config: ModelConfig
    tokenizer: TextTokenizer
    metadata: dict
    directory: Path


def model_directory(spec: str | Path) -> Path:
    """A model directory from MODEL: the directory itself or a file inside it."""
    path = Path(spec)
    if path.is_file() and path.name in (MODEL_JSON, WEIGHTS):
        path = path.parent
    if not path.exists():
        raise NoodleError(f"model {spec}: no such directory")
    if not path.is_dir():
        raise NoodleError(f"model {spec}: expected a model directory, model.json or {WEIGHTS}")
    for name in (MODEL_JSON, WEIGHTS):
        if not (path / name).is_file():
            raise NoodleError(f"model {spec}: {name} is missing from {path}")
    return path


def model_tokenizer(directory: Path, metadata: dict, spec: str | Path) -> TextTokenizer:
    """The directory's tokenizer.json. Without one, the packaged tokenizer stands in only
    if it is the one model.json says the model was trained with."""
    path = directory / TOKENIZER
    if path.exists():
        return load_tokenizer(path)
    packaged = load_tokenizer()
    recorded = metadata.get("tokenizer")
    if isinstance(recorded, dict) and recorded.get("sha256") not in (None, packaged.sha256):
        raise NoodleError(f"model {spec}: {TOKENIZER} is missing from {directory}")
    return packaged


def load_model(spec: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a model directory; never executes pickled code."""
    directory = model_directory(spec)
    metadata = read_json_file(directory / MODEL_JSON)
    config, _ = config_from_dict(metadata, str(directory / MODEL_JSON))
    tokenizer = model_tokenizer(directory, metadata, spec)
    if tokenizer.vocab_size > config.vocab_size:
        raise NoodleError(
            f"model {spec}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}"
        )
    try:
        weights = load_safetensors((directory / WEIGHTS).read_bytes())
    except (SafetensorError, OSError) as exc:
        raise NoodleError(f"model {spec}: unreadable weights ({exc})") from None
    model = NoodleModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (
            unexpected and f"unexpected {unexpected[0]}"
        )
        if not detail:
            name = wrong[0]
            detail = (
                f"{name} is {tuple(weights[name].shape)}, expected {tuple(expected[name].shape)}"
            )
        raise NoodleError(f"model {spec}: weights do not match model.json ({detail})")
    model.load_state_dict(weights)
    model.to(device).eval()
    return LoadedModel(model, config, tokenizer, metadata, directory)

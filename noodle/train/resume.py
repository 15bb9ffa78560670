"""A run's identity and its resume state.

The identity says what a run trains (architecture, tokenizer, data) and with which
settings; it is built once, saved in the resume state, and `--resume` refuses a saved
run whose identity differs. The resume state is one safetensors file: the model's trained
weights (all of them, or a LoRA run's adapters alone), one section of tensors per
optimizer, the loss scale and the RNG states (of every process of the run), with the train
state, the schedule, each optimizer's parameter groups and the identity in its JSON
header.

Its tensors are whole, however the run was spread over processes (a sharded run gathers
them to its first process, which writes the file): a run resumes on another number of
processes, sharded or not.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from noodle.checkpoint import (
    MODEL_JSON,
    RESUME,
    TOKENIZER,
    ModelDir,
    SavedTensors,
    open_resume_state,
    unwrap,
)
from noodle.errors import NoodleError
from noodle.parallel import Parallel
from noodle.train.optim import LossScale, Schedule
from noodle.train.settings import (
    SETTING_OPTIONS,
    TrainSettings,
    TrainState,
    settings_fingerprint,
)

# Bumped when the resume state's layout changes; another layout is refused, not misread.
# Format 3 added the schedule's `requested_steps`, which a format-2 state simply lacks.
RESUME_FORMAT = 3
READABLE_RESUME_FORMATS = (2, RESUME_FORMAT)


def run_identity(settings: TrainSettings, **parts: object) -> dict:
    """What a run trains (`parts`: architecture, tokenizer, base model, ...) with the
    settings that decide its outcome."""
    return {**parts, "settings": settings_fingerprint(settings)}


def first_difference(
    saved: dict, current: dict, path: tuple[str, ...] = ()
) -> tuple[tuple[str, ...], object, object] | None:
    """The first entry of `current` that `saved` disagrees with, as (its path of keys, the
    saved value, the current value), or None."""
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            found = first_difference(old, value, (*path, key))
            if found:
                return found
        elif old != value:
            return (*path, key), old, value
    return None


def saved_options(output_dir: str) -> dict:
    """The options (settings an option sets) that the run saved in `output_dir` was started
    with, by setting name: a resumed run's defaults; none where nothing readable is saved
    (resuming then fails with its own message)."""
    try:
        _, saved = open_resume_state(Path(output_dir) / RESUME)
    except NoodleError:
        return {}
    settings = saved.get("identity", {}).get("settings", {})
    return {name: value for name, value in settings.items() if SETTING_OPTIONS.get(name)}


def recorded_source(out: ModelDir) -> str:
    """What the saved run trained on, as its model.json names it."""
    try:
        training = json.loads(out.file(MODEL_JSON).read_text(encoding="utf-8"))["training"]
        return str(training["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def describe_difference(path: tuple[str, ...], old: object, new: object, out: ModelDir) -> str:
    """A difference between two run identities in the user's terms: options and files."""
    part, name = path[0], path[-1]
    if part == "settings":
        option = SETTING_OPTIONS.get(name)
        label = option or f"{name} (set by noodle, not an option)"
        return f"{label} was {old!r}, now {new!r}"
    if part == "architecture":
        return f"--model: its {name} was {old!r}, now {new!r}"
    if part == "tokenizer":
        return f"--tokenizer: another tokenizer than the run's {out.file(TOKENIZER)}"
    if part == "corpus":
        return (
            f"the corpus: its text differs from what the run trained on "
            f"({recorded_source(out)}), edited or another file"
        )
    if part == "examples":
        return (
            f"the instruction file: its examples differ from those the run trained on "
            f"({recorded_source(out)})"
        )
    if part == "base_model":
        return f"the base model: was {old or 'none (a run of noodle train)'}, now {new}"
    if part == "lora":
        return describe_adapters_difference(path, old, new)
    if part == "base_weights":
        return (
            "the base model's weights: they changed since the run started, and its resume "
            "state holds only adapters trained on the old ones"
        )
    return f"{'.'.join(path)} was {old!r}, now {new!r}"


LORA_OPTIONS = {"rank": "--lora-rank", "alpha": "--lora-alpha", "targets": "--lora-targets"}


def describe_adapters_difference(path: tuple[str, ...], old: object, new: object) -> str:
    """A difference in the adapters of a run (its "lora" part: None or LoraSettings'
    dict, or one of its settings) in the user's terms."""
    if len(path) > 1:

        def value(setting: object) -> str:
            return repr(",".join(setting) if isinstance(setting, list) else setting)

        return f"{LORA_OPTIONS.get(path[-1], path[-1])} was {value(old)}, now {value(new)}"

    def adapters(part: object) -> str:
        if not isinstance(part, dict):
            return "none (every weight trained)"
        return f"LoRA rank {part.get('rank')}"

    return f"the adapters: was {adapters(old)}, now {adapters(new)}"


def saved_dropout(out: ModelDir) -> float:
    """The dropout of the run saved in `out` (see `check_resumable`: a resumable one)."""
    return out.read_resume_metadata()["identity"]["architecture"]["dropout"]


def check_resumable(out: ModelDir, identity: dict) -> None:
    """Refuse to resume the run saved in `out` unless it was saved in this layout and
    matches `identity` (or whichever of its parts are given)."""
    saved = out.read_resume_metadata()
    if saved.get("format") not in READABLE_RESUME_FORMATS:
        raise NoodleError(
            f"cannot resume {out.path}: its resume state was written by another version of "
            "noodle; start a new run in another output directory"
        )
    difference = first_difference(saved["identity"], identity)
    if difference:
        raise NoodleError(
            f"cannot resume {out.path}: the run differs from the interrupted one in "
            f"{describe_difference(*difference, out)}; resume with the same corpus, model and "
            "options"
        )


@dataclass
class TrainingParts:
    """Everything the resume state saves and restores, besides the train state."""

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    loss_scale: LossScale | None
    device: torch.device
    parallel: Parallel


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of the model's state dict that training changes: its parameters that
    take gradients. A run with frozen weights (LoRA's base) reads them again from where it
    started them, so that its resume state holds only what it trains."""
    return {
        name: value.detach()
        for name, value in unwrap(model).state_dict(keep_vars=True).items()
        if value.requires_grad
    }


def resume_tensors(parts: TrainingParts) -> dict[str, torch.Tensor]:
    """The resume state's tensors, where they live (on the device; sharded ones as this
    process's shard: see `Parallel.gathered`). Every process must call it: the first
    gathers the others' RNG states."""
    tensors = {f"model.{k}": v for k, v in trained_state(parts.model).items()}
    for name, optimizer in parts.optimizers.items():
        for index, values in optimizer.state_dict()["state"].items():
            for key, value in values.items():
                tensors[f"optimizer.{name}.{index}.{key}"] = value
    if parts.loss_scale is not None:
        for key, value in parts.loss_scale.state_dict().items():
            tensors[f"loss_scale.{key}"] = value
    rng = {"rng.cpu": torch.get_rng_state()}
    if parts.device.type == "cuda":
        rng["rng.cuda"] = torch.cuda.get_rng_state(parts.device)
    elif parts.device.type == "mps":
        rng["rng.mps"] = torch.mps.get_rng_state()
    return {**tensors, **parts.parallel.rng_states(rng)}


def resume_metadata(
    parts: TrainingParts, state: TrainState, schedule: Schedule, identity: dict
) -> dict:
    groups = {}
    for name, optimizer in parts.optimizers.items():
        groups[name] = copy.deepcopy(optimizer.state_dict()["param_groups"])
    return {
        "format": RESUME_FORMAT,
        "train_state": asdict(state),
        "schedule": schedule.to_dict(),
        "param_groups": groups,
        "identity": identity,
        "processes": parts.parallel.world_size,
    }


def restore(
    parts: TrainingParts, tensors: SavedTensors, saved: dict
) -> tuple[TrainState, Schedule]:
    """Load a resume state into `parts`, each tensor laid out as the part it goes to is
    (sharded or not); returns the saved train state and schedule. The model's frozen
    weights, which it does not hold, stay as they are.

    Each process restores its own RNG states. A process the saved run did not have keeps
    the stream it was given at the start (see `Parallel.seed_streams`)."""
    parallel = parts.parallel
    trained = list(trained_state(parts.model))
    missing = [name for name in trained if f"model.{name}" not in tensors]
    if missing:
        raise NoodleError(f"{tensors.path}: corrupt resume state (it has no {missing[0]})")
    parallel.load_state(unwrap(parts.model), trained, lambda name: tensors[f"model.{name}"])
    for name, optimizer in parts.optimizers.items():
        prefix = f"optimizer.{name}."
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state: dict[int, dict] = {}
        for key in tensors:
            if key.startswith(prefix):
                index, item = key.removeprefix(prefix).split(".", 1)
                param = params[int(index)]
                # Moments are shaped (and sharded) like their parameter; a step count is not.
                like = param if tensors.shape(key) == tuple(param.shape) else None
                value = parallel.place(lambda key=key: tensors[key], like)
                state.setdefault(int(index), {})[item] = value
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"][name]})
    # A run saved in another precision has no loss scale to restore: it starts afresh.
    if parts.loss_scale is not None and "loss_scale.scale" in tensors:
        parts.loss_scale.load_state_dict(
            {key: tensors[f"loss_scale.{key}"] for key in parts.loss_scale.state_dict()}
        )
    own = {name: parallel.own_rng_name(name) for name in ("rng.cpu", "rng.cuda", "rng.mps")}
    if own["rng.cpu"] in tensors:
        torch.set_rng_state(tensors[own["rng.cpu"]])
    if parts.device.type == "cuda" and own["rng.cuda"] in tensors:
        torch.cuda.set_rng_state(tensors[own["rng.cuda"]], parts.device)
    elif parts.device.type == "mps" and own["rng.mps"] in tensors:
        torch.mps.set_rng_state(tensors[own["rng.mps"]])
    known = {f.name for f in fields(TrainState)}
    train_state = TrainState(**{k: v for k, v in saved["train_state"].items() if k in known})
    return train_state, Schedule.from_dict(saved["schedule"])

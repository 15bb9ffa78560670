"""Model architecture: the config dataclass, the presets and reading configs from JSON, and
the shape of LoRA adapters on a model (see noodle.lora)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from noodle.errors import NoodleError, UsageError, did_you_mean

VOCAB_MULTIPLE = 128
# 40 TB of float32 weights: beyond any machine, so a config past it is a typo.
MAX_PARAMETERS = 10**13


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 4
    emb_dim: int = 256
    n_heads: int = 4
    head_dim: int = 64
    hidden_dim: int = 1024
    ctx_len: int = 256
    vocab_size: int = 50304
    dropout: float = 0.1
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("n_layers", "emb_dim", "n_heads", "head_dim", "hidden_dim", "ctx_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise NoodleError(f"model config: {name} must be a positive integer, got {value!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise NoodleError(
                f"model config: vocab_size must be an integer, got {self.vocab_size!r}"
            )
        if self.vocab_size < 2:
            raise NoodleError(f"model config: vocab_size must be at least 2, got {self.vocab_size}")
        if self.head_dim % 2:
            raise NoodleError(
                f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise NoodleError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rope_base, (int, float)) or self.rope_base <= 1:
            raise NoodleError(f"model config: rope_base must be > 1, got {self.rope_base!r}")
        if self.parameter_count() > MAX_PARAMETERS:
            raise NoodleError(
                f"model config: {self.parameter_count():,} parameters is beyond any machine "
                f"(at most {MAX_PARAMETERS:,}); check n_layers, emb_dim and hidden_dim"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def parameter_count(self) -> int:
        attn = self.emb_dim * 3 * self.n_heads * self.head_dim + 3 * self.n_heads * self.head_dim
        attn += self.n_heads * self.head_dim * self.emb_dim + self.emb_dim
        mlp = 2 * self.emb_dim * self.hidden_dim + self.hidden_dim + self.emb_dim
        norms = 4 * self.emb_dim
        block = attn + mlp + norms
        embedding = self.vocab_size * self.emb_dim
        head = self.emb_dim * self.vocab_size + self.vocab_size
        return embedding + self.n_layers * block + 2 * self.emb_dim + head


# The Linear layers of each block that can get low-rank adapters: the fused query/key/value
# projection, the attention's output projection, the MLP's up and down projections.
LORA_TARGETS = ("qkv", "proj", "up", "down")


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adaptation: each target layer's frozen weight W computes as W + scale · B A,
    with A (rank × inputs) and B (outputs × rank) trained and scale = alpha / rank."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        """As JSON holds it (the run's identity compares it with a saved one)."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    def description(self) -> str:
        return f"rank {self.rank}, alpha {self.alpha:g}, on {','.join(self.targets)}"


PRESETS: dict[str, ModelConfig] = {
    "somen": ModelConfig(),
    "soba": ModelConfig(
        n_layers=28, emb_dim=1024, n_heads=16, head_dim=128, hidden_dim=4096, ctx_len=1024
    ),
    "udon": ModelConfig(
        n_layers=50, emb_dim=6656, n_heads=52, head_dim=128, hidden_dim=26624, ctx_len=4096
    ),
    # A first model in minutes on a laptop CPU. With the 50K-token vocabulary a model this
    # small spends most of its time in the embedding and output layers, so it learns its
    # own small tokenizer from the corpus (PRESET_TOKENIZERS). Its short runs underfit:
    # dropout would only slow them down.
    "harusame": ModelConfig(
        n_layers=4, emb_dim=128, n_heads=4, head_dim=32, hidden_dim=512, ctx_len=128, dropout=0.0
    ),
}
DEFAULT_PRESET = "somen"
# The `--tokenizer` of a preset that does not use the bundled one (see tokenizer.py).
PRESET_TOKENIZERS = {"harusame": "bpe:4096"}

ARCHITECTURE_KEYS = frozenset(f.name for f in fields(ModelConfig))
# model.json carries these beside the architecture; a CONFIG.json may be a copy of one.
MODEL_JSON_EXTRA_KEYS = frozenset(
    {"format_version", "preset", "tokenizer", "training", "parameters", "noodle_version"}
)


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """Round the tokenizer's vocabulary up to a multiple of 128 for fast matrix shapes."""
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def config_from_dict(data: object, source: str) -> tuple[ModelConfig, bool]:
    """Build a config from model.json-shaped data; missing architecture keys come from somen.

    Returns the config and whether the data named vocab_size itself.
    """
    if not isinstance(data, dict):
        raise NoodleError(f"{source}: expected a JSON object with architecture keys")
    unknown = sorted(set(data) - ARCHITECTURE_KEYS - MODEL_JSON_EXTRA_KEYS)
    if unknown:
        known = ", ".join(sorted(ARCHITECTURE_KEYS))
        raise NoodleError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {known})")
    values = {key: data[key] for key in ARCHITECTURE_KEYS if key in data}
    try:
        config = replace(PRESETS[DEFAULT_PRESET], **values)
    except NoodleError as exc:
        raise NoodleError(f"{source}: {exc}") from None
    return config, "vocab_size" in values


def read_json_file(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NoodleError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NoodleError(f"{path}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise NoodleError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None


def resolve_model_config(spec: str, tokenizer_vocab: int) -> tuple[str, ModelConfig]:
    """Turn `--model` (a preset name or a CONFIG.json path) into (preset name, config).

    A preset, or a config that does not name vocab_size, gets the tokenizer's padded
    vocabulary; a config that names one must hold every token of the tokenizer.
    """
    if spec in PRESETS:
        name, config, explicit_vocab = spec, PRESETS[spec], False
    elif spec.endswith(".json") or Path(spec).is_file():
        config, explicit_vocab = config_from_dict(read_json_file(Path(spec)), spec)
        name = "custom"
    else:
        raise UsageError(
            f"unknown model preset {spec!r}{did_you_mean(spec, PRESETS)} (choose "
            f"{', '.join(PRESETS)} or a CONFIG.json path)"
        )
    if not explicit_vocab:
        return name, replace(config, vocab_size=padded_vocab_size(tokenizer_vocab))
    if config.vocab_size < tokenizer_vocab:
        raise NoodleError(
            f"{spec}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab} tokens"
        )
    return name, config

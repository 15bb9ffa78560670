"""`noodle export`: a model directory as a Hugging Face transformers model directory.

The result loads with `AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`
and `AutoTokenizer.from_pretrained(OUT_DIR)`: config.json with its own model type and an
auto_map to the modelling code beside it (noodle/assets/hf, shipped with the package), the
weights under transformers-style names, the tokenizer files and a model card. Writing it
needs nothing but noodle; loading it needs transformers.
"""

from __future__ import annotations

import os
import secrets
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from noodle.checkpoint import (
    WEIGHTS,
    ModelFiles,
    check_output_dir,
    open_model_dir,
    write_safetensors,
)
from noodle.config import ModelConfig
from noodle.errors import NoodleError
from noodle.files import atomic_write, atomic_write_bytes, atomic_write_json, fsync_directory
from noodle.info import training_rows
from noodle.model import QK_NORM_EPS
from noodle.progress import Reporter
from noodle.tokenizer import END_OF_TEXT, PADDING, TextTokenizer, load_tokenizer

MODEL_TYPE = "noodle"
ASSETS = resources.files("noodle") / "assets" / "hf"  # the modelling code and the card
CODE_FILES = ("configuration_noodle.py", "modeling_noodle.py")
AUTO_MAP = {
    "AutoConfig": "configuration_noodle.NoodleConfig",
    "AutoModel": "modeling_noodle.NoodleModel",
    "AutoModelForCausalLM": "modeling_noodle.NoodleForCausalLM",
}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which noodle's model uses

# noodle's parameter names -> transformers-style names.
TOP_LEVEL_NAMES = {"tok_emb": "model.embed_tokens", "ln_f": "model.norm", "head": "lm_head"}
BLOCK_NAMES = {
    "ln1": "input_layernorm",
    "attn.qkv": "self_attn.qkv_proj",
    "attn.proj": "self_attn.o_proj",
    "ln2": "post_attention_layernorm",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def transformers_name(name: str) -> str:
    """`blocks.3.attn.qkv.weight` -> `model.layers.3.self_attn.qkv_proj.weight`, etc."""
    module, parameter = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, index, inner = module.split(".", 2)
        return f"model.layers.{index}.{BLOCK_NAMES[inner]}.{parameter}"
    return f"{TOP_LEVEL_NAMES[module]}.{parameter}"


def transformers_config(config: ModelConfig, tokenizer: TextTokenizer, dtype: torch.dtype) -> dict:
    pad_id = tokenizer.eot_id if tokenizer.pad_id is None else tokenizer.pad_id
    return {
        "architectures": ["NoodleForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": AUTO_MAP,
        "vocab_size": config.vocab_size,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "hidden_size": config.emb_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "max_position_embeddings": config.ctx_len,
        "rope_theta": config.rope_base,
        "dropout": config.dropout,
        "layer_norm_eps": LAYER_NORM_EPS,
        "qk_norm_eps": QK_NORM_EPS,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def special_tokens(tokenizer: TextTokenizer) -> dict:
    """End-of-text begins and ends documents; padding pads (end-of-text when there is none)."""
    pad = END_OF_TEXT if tokenizer.pad_id is None else PADDING
    return {
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "pad_token": pad,
    }


def tokenizer_config(tokenizer: TextTokenizer, config: ModelConfig) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens(tokenizer),
        # noodle encodes text as it is: no token is added at either end.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.ctx_len,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids
    }


def tokenizer_license(tokenizer: TextTokenizer) -> str:
    if tokenizer.sha256 == load_tokenizer().sha256:
        return (
            "The tokenizer is GPT-NeoX-20B's byte-level BPE by EleutherAI, licensed under the "
            "Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0)."
        )
    return (
        f"The tokenizer is not noodle's bundled one (sha256 {tokenizer.sha256}); its "
        "license is that of its source."
    )


def markdown_table(rows: list[tuple[str, str]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def model_card(files: ModelFiles, name: str) -> str:
    """README.md: what the model is, how it was trained, how to use it, the tokenizer's
    license."""
    config, tokenizer, metadata = files.config, files.tokenizer, files.metadata
    training = metadata.get("training")
    training = training if isinstance(training, dict) else {}
    architecture = [
        ("preset", str(metadata.get("preset", "custom"))),
        ("parameters", f"{config.parameter_count():,}"),
        ("layers", str(config.n_layers)),
        ("width (emb_dim)", str(config.emb_dim)),
        ("attention heads × head size", f"{config.n_heads} × {config.head_dim}"),
        ("MLP hidden size", str(config.hidden_dim)),
        ("context length", f"{config.ctx_len:,} tokens"),
        ("vocabulary", f"{tokenizer.vocab_size:,} tokens, padded to {config.vocab_size:,}"),
        ("rotary base", f"{config.rope_base:g}"),
    ]
    training_section = markdown_table(training_rows(training))
    base = training.get("base_training")
    if training.get("kind") == "finetune" and isinstance(base, dict):
        training_section += (
            f"\n\nFine-tuned from `{training.get('base_model')}`, itself trained as follows:"
            f"\n\n{markdown_table(training_rows(base))}"
        )
    template = (ASSETS / "model_card.md").read_text(encoding="utf-8")
    return template.format(
        name=name,
        noodle_version=training.get("noodle_version", ""),
        architecture=markdown_table(architecture),
        training=training_section,
        tokenizer_license=tokenizer_license(tokenizer),
    )


def check_export_dir(path: Path) -> Path:
    path = check_output_dir(path)
    if path.is_dir() and any(path.iterdir()):
        raise NoodleError(f"{path} exists and is not empty; export into a new or empty directory")
    return path


def write_export(
    files: ModelFiles, tensors: dict[str, torch.Tensor], directory: Path, name: str
) -> None:
    config, tokenizer = files.config, files.tokenizer
    model_config = transformers_config(config, tokenizer, tensors["lm_head.weight"].dtype)
    atomic_write_json(directory / "config.json", model_config)
    generation = {
        key: model_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    atomic_write_json(directory / "generation_config.json", generation)
    for code_file in CODE_FILES:
        atomic_write_bytes(directory / code_file, (ASSETS / code_file).read_bytes())
    atomic_write(
        directory / WEIGHTS,
        lambda handle: write_safetensors(handle, tensors, {"format": "pt"}),
    )
    atomic_write_bytes(directory / "tokenizer.json", tokenizer.raw)
    atomic_write_json(directory / "tokenizer_config.json", tokenizer_config(tokenizer, config))
    atomic_write_json(directory / "special_tokens_map.json", special_tokens(tokenizer))
    atomic_write_bytes(directory / "README.md", model_card(files, name).encode("utf-8"))


def export_model(spec: str, out_dir: Path, reporter: Reporter) -> None:
    """Write the model at `spec` into `out_dir` (new, or an empty directory), all at once:
    the files are written into a temporary directory beside it, renamed into place at
    the end, so a failure leaves no partial export."""
    files = open_model_dir(spec)
    out_dir = check_export_dir(out_dir)
    try:
        weights = load_file(files.directory / WEIGHTS)
    except (SafetensorError, OSError) as exc:
        raise NoodleError(f"model {spec}: unreadable weights ({exc})") from None
    tensors = {transformers_name(name): t.contiguous() for name, t in weights.items()}
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise NoodleError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    try:
        write_export(files, tensors, staging, out_dir.name)
        os.replace(staging, out_dir)  # an empty out_dir is replaced too
        fsync_directory(out_dir.parent)
    except OSError as exc:
        raise NoodleError(f"cannot write {out_dir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone once renamed
    reporter.info(
        f"exported {files.directory} ({files.config.parameter_count():,} parameters) to "
        f"{out_dir}: load it with AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, "
        "trust_remote_code=True)"
    )

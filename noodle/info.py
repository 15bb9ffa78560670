"""`noodle info`: what a model directory holds, as a table, without reading its JSON."""

from __future__ import annotations

from rich.table import Table

from noodle.checkpoint import (
    RESUME,
    TOKENIZER,
    WEIGHTS,
    open_model_dir,
    run_status,
    weights_description,
)

ARCHITECTURE_ROWS = (
    "n_layers",
    "emb_dim",
    "n_heads",
    "head_dim",
    "hidden_dim",
    "ctx_len",
    "vocab_size",
    "dropout",
    "rope_base",
)
# A fine-tuned model shows this much of its base model's training summary.
BASE_ROWS = ("kind", "steps", "tokens seen", "best validation loss", "source")
MISSING = "-"


def show(value: object) -> str:
    return MISSING if value is None else str(value)


def count(value: object) -> str:
    """Steps, tokens, parameters: with thousands separators."""
    return f"{value:,}" if isinstance(value, int) else show(value)


def validation_loss(training: dict) -> str:
    loss = training.get("best_val_loss")
    if not isinstance(loss, (int, float)):
        return MISSING
    return f"{loss:.4f} (step {count(training.get('best_step'))})"


def training_rows(training: dict) -> list[tuple[str, str]]:
    return [
        ("kind", show(training.get("kind"))),
        ("status", run_status(training) if training.get("status") else MISSING),
        ("steps", count(training.get("steps"))),
        ("epochs", count(training.get("epochs"))),
        ("tokens seen", count(training.get("tokens_seen"))),
        ("best validation loss", validation_loss(training)),
        ("source", show(training.get("source"))),
        ("batch size", show(training.get("batch_size"))),
        ("learning rate", show(training.get("lr"))),
        ("seed", show(training.get("seed"))),
        ("date", show(training.get("date"))),
        ("noodle version", show(training.get("noodle_version"))),
    ]


def adapters_description(lora: object) -> str:
    """What a fine-tuning run trained: every weight, or LoRA adapters (merged into the
    weights, and kept alone in their own file)."""
    if not isinstance(lora, dict):
        return "every weight"
    targets = lora.get("targets")
    targets = ",".join(targets) if isinstance(targets, list) else MISSING
    return (
        f"LoRA adapters, rank {show(lora.get('rank'))}, alpha {show(lora.get('alpha'))}, on "
        f"{targets}: {count(lora.get('trained_parameters'))} parameters, merged into the "
        f"weights and kept alone in {show(lora.get('file'))}"
    )


def model_table(spec: str) -> Table:
    """Architecture, parameter count, tokenizer and training summary of the model at `spec`;
    a fine-tuned model also shows its base model's training. A directory that eval or chat
    would refuse is refused here too, but the weights' data is never read."""
    files = open_model_dir(spec)
    directory, metadata, config = files.directory, files.metadata, files.config
    table = Table(title=f"model {directory}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    table.add_row("preset", show(metadata.get("preset", "custom")))
    for name in ARCHITECTURE_ROWS:
        table.add_row(name, count(getattr(config, name)))
    table.add_row("parameters", count(config.parameter_count()))
    weights_mb = (directory / WEIGHTS).stat().st_size / 1e6
    table.add_row("weights", f"{WEIGHTS} ({weights_mb:,.1f} MB)")
    resume = directory / RESUME
    if resume.is_file():
        table.add_row(
            "resume state",
            f"{RESUME} ({resume.stat().st_size / 1e6:,.1f} MB; only --resume needs it, to "
            "continue or extend the run)",
        )

    table.add_section()
    tokenizer = metadata.get("tokenizer")
    tokenizer = tokenizer if isinstance(tokenizer, dict) else {}
    has_file = (directory / TOKENIZER).is_file()
    table.add_row("tokenizer", TOKENIZER if has_file else "the bundled GPT-NeoX-20B tokenizer")
    table.add_row("tokenizer vocabulary", count(tokenizer.get("vocab_size")))
    table.add_row("end-of-text id", show(tokenizer.get("end_of_text_id")))
    table.add_row("padding id", show(tokenizer.get("padding_id")))
    table.add_row("tokenizer sha256", show(tokenizer.get("sha256")))

    table.add_section()
    training = metadata.get("training")
    training = training if isinstance(training, dict) else {}
    for name, value in training_rows(training):
        table.add_row(name, value)
    if training.get("status"):
        table.add_row("weights saved", weights_description(training))
    base = training.get("base_training")
    if training.get("kind") == "finetune":
        table.add_row("examples", count(training.get("examples")))
        table.add_row("trained", adapters_description(training.get("lora")))
        table.add_section()
        table.add_row("base model", show(training.get("base_model")))
        for name, value in training_rows(base if isinstance(base, dict) else {}):
            if name in BASE_ROWS:
                table.add_row(f"base {name}", value)
    return table

"""Training throughput of `noodle train`'s real step, beside nanoGPT's model: tokens/s, MFU
and peak memory, with the ratio to nanoGPT and variants of our step, in one process.

Our step is the Trainer that `noodle train` runs (batch fetch, autocast, compiled model,
fused AdamW, gradient clipping, NaN guard), on random tokens. nanoGPT's reference is its
own model.py (karpathy/nanoGPT, kept out of this repository: put it in a git-ignored
folder such as .devdata/nanogpt/ and pass --nanogpt) trained as its train.py does: bf16
autocast, torch.compile, fused AdamW, clipping to 1.0, dropout 0, tied embeddings.

A row of our step is SHAPE:BATCH[:VARIANT]; a variant changes training settings (any
TrainSettings field), the model's dropout or the compiler's configuration (see VARIANTS,
or define one with --define). Rows run in the order given, each after a fresh compile;
with --budget-s, rows that would start later are skipped and listed. PREDICTIONS holds
what each row was expected to give on an NVIDIA H200 before it was measured.

    PYTHONPATH=. python benchmarks/train_speed.py --device cuda --nanogpt .devdata/nanogpt \\
        --dropout 0 --variants gpt2:16:plain,gpt2:16:whole,somen:64:plain
    PYTHONPATH=. python benchmarks/train_speed.py --device cpu --shapes tiny:2 --steps 2
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/train_speed.py --device cpu \
        --shapes harusame:16,somen:8 --compile off --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from noodle.batching import TokenWindows
from noodle.checkpoint import ModelDir
from noodle.config import PRESETS, ModelConfig, config_from_dict
from noodle.device import select_device, select_dtype, synchronize
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.train.loop import Trainer
from noodle.train.settings import TrainSettings

SHAPES = {
    "tiny": ModelConfig(n_layers=2, emb_dim=64, n_heads=2, head_dim=32, hidden_dim=128, ctx_len=64),
    "somen": PRESETS["somen"],
    "gpt2": ModelConfig(
        n_layers=12, emb_dim=768, n_heads=12, head_dim=64, hidden_dim=3072, ctx_len=1024
    ),
    # soba's depth and width with nanoGPT's head layout (8 heads x 128 = emb_dim), so that
    # nanoGPT can be the reference at a large shape.
    "28x1024": ModelConfig(
        n_layers=28, emb_dim=1024, n_heads=8, head_dim=128, hidden_dim=4096, ctx_len=1024
    ),
    "soba": PRESETS["soba"],
    # With the 4,096-token vocabulary it learns from its corpus (--tokenizer bpe:4096).
    "harusame": replace(PRESETS["harusame"], vocab_size=4096),
}
# Dense bf16 tensor-core peak of an H100/H200 SXM, the reference the nanoGPT MFU figures use.
PEAK_FLOPS = {"cuda": 989e12}
REFERENCE = "nanogpt"


@dataclass(frozen=True)
class Variant:
    """A change to our step: TrainSettings fields, the model's dropout, and
    torch._inductor.config entries (keys "inductor.NAME")."""

    settings: dict = field(default_factory=dict)
    dropout: float | None = None
    inductor: dict = field(default_factory=dict)


VARIANTS = {
    "default": Variant(),  # TrainSettings' defaults: the fused loss when compiled
    "plain": Variant({"loss_chunk": 0}),  # all the logits, F.cross_entropy (the old step)
    "chunk256": Variant({"loss_chunk": 256}),
    "chunk1024": Variant({"loss_chunk": 1024}),
    "whole": Variant({"loss_chunk": 1 << 30}),  # the fused loss in one chunk
    "coordinate": Variant(inductor={"coordinate_descent_tuning": True}),
    "muon": Variant({"optimizer": "muon"}),  # BatchedMuon on the blocks' matrices
    "no-cudagraphs": Variant({"compile_mode": "default"}),
    "dropout0.1": Variant(dropout=0.1),
}

# tokens/s expected on one NVIDIA H200 (torch 2.11, bf16, compile), written before the
# run: (low, high). Basis: issue 16's measurements of the old step and of nanoGPT, and
# bytes moved by what changed (benchmarks/RESULTS.md, "Predictions").
PREDICTIONS = {
    ("gpt2", 16, REFERENCE): (440_000, 480_000),
    ("gpt2", 16, "default"): (445_000, 465_000),
    ("gpt2", 16, "plain"): (435_000, 460_000),
    ("gpt2", 16, "whole"): (445_000, 466_000),
    ("somen", 64, REFERENCE): (1_900_000, 2_100_000),
    ("somen", 64, "default"): (2_300_000, 2_450_000),
    ("somen", 64, "plain"): (2_200_000, 2_340_000),
    # The update replayed as one CUDA graph: AdamW's step plus Newton-Schulz's GPU time on
    # 16 stacked matrices (~15 GFLOP), whatever the host.
    ("somen", 64, "muon"): (2_100_000, 2_250_000),
    # Triton kernel configs tuned for the memory-bound ~40% of the step: +1-4%.
    ("gpt2", 16, "coordinate"): (455_000, 470_000),
    ("28x1024", 8, REFERENCE): (145_000, 160_000),
    ("28x1024", 8, "default"): (143_000, 150_000),
    ("soba", 8, "default"): (108_000, 112_000),
    ("somen", 8, REFERENCE): (200_000, 260_000),
    ("somen", 8, "default"): (450_000, 700_000),
}


def flops_per_token(config: ModelConfig) -> float:
    """6 × (weights used in matmuls) + attention scores, as nanoGPT's estimate_mfu counts."""
    matmul_params = config.parameter_count() - config.vocab_size * config.emb_dim
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * config.ctx_len
    return 6 * matmul_params + attention


def shape_config(shape: str) -> ModelConfig:
    """A named shape, or a CONFIG.json in model.json's form."""
    if shape in SHAPES:
        return SHAPES[shape]
    return config_from_dict(json.loads(Path(shape).read_text()), shape)[0]


def parse_value(text: str) -> object:
    """A variant's value: a JSON number, true/false/null, or else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant(spec: str) -> tuple[str, Variant]:
    """NAME:key=value,key=value (keys: TrainSettings fields, dropout, inductor.NAME)."""
    name, _, body = spec.partition(":")
    settings_fields = {f.name for f in fields(TrainSettings)}
    settings, inductor, dropout = {}, {}, None
    for item in filter(None, body.split(",")):
        key, _, text = item.partition("=")
        value = parse_value(text)
        if key == "dropout":
            dropout = value
        elif key.startswith("inductor."):
            inductor[key.removeprefix("inductor.")] = value
        elif key in settings_fields:
            settings[key] = value
        else:
            raise SystemExit(f"error: unknown variant key {key!r} in {spec!r}")
    return name, Variant(settings, dropout, inductor)


@dataclass(frozen=True)
class Row:
    shape: str
    batch: int
    variant: str  # a key of VARIANTS, or REFERENCE for nanoGPT's model

    @classmethod
    def parse(cls, spec: str, variant: str = "default") -> Row:
        parts = spec.split(":")
        if len(parts) == 3:
            variant = parts.pop()
        return cls(parts[0], int(parts[1]), variant)


def random_tokens(count: int, vocab_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, count).astype(np.uint16)


def row_result(
    row: Row,
    device: torch.device,
    tokens_per_s: float,
    flops: float,
    elapsed: float,
    steps: int,
    warmup_s: float,
) -> dict:
    peak = PEAK_FLOPS.get(device.type)
    cuda = device.type == "cuda"
    return {
        "shape": row.shape,
        "batch": row.batch,
        "variant": row.variant,
        "tokens_per_s": round(tokens_per_s),
        "mfu": round(tokens_per_s * flops / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "step_ms": round(1000 * elapsed / steps, 2),
        "warmup_s": round(warmup_s, 1),
    }


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Run `step(index)` warmup + steps times; (seconds of the timed steps, of the warm-up,
    which includes compiling)."""
    started = time.perf_counter()
    for index in range(warmup):
        step(index)
    synchronize(device)
    timed = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    synchronize(device)
    return time.perf_counter() - timed, timed - started


def measure(
    row: Row,
    variant: Variant,
    compile_model: bool,
    steps: int,
    warmup: int,
    device: torch.device,
    dropout: float | None = None,
    compile_mode: str = TrainSettings.compile_mode,
) -> dict:
    """Our training step at one shape, batch size and variant."""
    config = shape_config(row.shape)
    dropout = variant.dropout if variant.dropout is not None else dropout
    if dropout is not None:
        config = replace(config, dropout=dropout)
    amp_dtype = select_dtype("auto", device)
    torch.manual_seed(0)
    model = NoodleModel(config).to(device)
    data = TokenWindows(
        random_tokens((warmup + steps) * row.batch * config.ctx_len + 1, config.vocab_size),
        config.ctx_len,
        row.batch,
    )
    chosen = {"batch_size": row.batch, "compile": compile_model, "compile_mode": compile_mode}
    settings = replace(TrainSettings(), **{**chosen, **variant.settings})
    with tempfile.TemporaryDirectory() as tmp, torch._inductor.config.patch(variant.inductor):
        trainer = Trainer(
            model,
            data,
            data,
            settings,
            ModelDir(tmp),
            device,
            amp_dtype,
            Reporter(quiet=True),
            identity={},
        )
        losses = []

        def step(index: int) -> None:
            batch = trainer.train_data.get(0, index)
            losses.append(trainer.train_step(batch, lr_factor=1.0)[0])

        elapsed, warmup_s = timed_steps(step, warmup, steps, device)
    tokens_per_s = steps * row.batch * config.ctx_len / elapsed
    return {
        **row_result(row, device, tokens_per_s, flops_per_token(config), elapsed, steps, warmup_s),
        "compile": settings.compile and settings.compile_mode,
        "loss_chunk": trainer.loss_chunk,
        "dropout": config.dropout,
        "final_loss": round(float(losses[-1]), 3),
    }


def load_nanogpt(folder: Path) -> ModuleType:
    """nanoGPT's model.py from `folder` (not part of this repository)."""
    path = folder / "model.py"
    if not path.is_file():
        raise SystemExit(f"error: no nanoGPT model.py in {folder}")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_equivalent(config: ModelConfig) -> bool:
    """nanoGPT's blocks have heads of emb_dim / n_heads and an MLP of 4 × emb_dim."""
    return (
        config.n_heads * config.head_dim == config.emb_dim
        and config.hidden_dim == 4 * config.emb_dim
    )


def measure_nanogpt(
    nanogpt: ModuleType, row: Row, steps: int, warmup: int, device: torch.device, dropout: float
) -> dict:
    """nanoGPT's training step as its train.py takes it, at our shape."""
    config = shape_config(row.shape)
    gpt_config = nanogpt.GPTConfig(
        block_size=config.ctx_len,
        vocab_size=config.vocab_size,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_embd=config.emb_dim,
        dropout=dropout,
        bias=True,
    )
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # its parameter counts and notes
        model = nanogpt.GPT(gpt_config).to(device)
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    compiled = torch.compile(model) if device.type == "cuda" else model
    amp_dtype = select_dtype("auto", device)
    length = config.ctx_len
    tokens = torch.from_numpy(
        random_tokens((warmup + steps) * row.batch * length + 1, config.vocab_size).astype(np.int64)
    )
    losses = []

    def step(index: int) -> None:
        start = index * row.batch * length
        window = tokens[start : start + row.batch * length + 1]
        x, y = window[:-1].view(row.batch, length), window[1:].view(row.batch, length)
        if device.type == "cuda":
            x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            _, loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    elapsed, warmup_s = timed_steps(step, warmup, steps, device)
    cfg = model.config
    flops = 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    tokens_per_s = steps * row.batch * length / elapsed
    return {
        **row_result(row, device, tokens_per_s, flops, elapsed, steps, warmup_s),
        "compile": device.type == "cuda" and "default",
        "dropout": dropout,
        "final_loss": round(float(losses[-1]), 3),
    }


def release(device: torch.device) -> None:
    """Forget compiled graphs and free their memory between rows."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def predicted(row: Row) -> str:
    low, high = PREDICTIONS.get((row.shape, row.batch, row.variant), (None, None))
    return "—" if low is None else f"{low / 1000:,.0f}–{high / 1000:,.0f}k"


def rate(result: dict | None) -> str:
    if result is None:
        return "—"
    mfu = f" ({100 * result['mfu']:.1f}%)" if result["mfu"] is not None else ""
    return f"{result['tokens_per_s']:,}{mfu}"


def memory(result: dict | None) -> str:
    return "—" if result is None or result["peak_mem_gib"] is None else f"{result['peak_mem_gib']}"


def print_tables(results: dict[Row, dict], ratio_rows: list[Row]) -> None:
    print(
        "\n| shape | batch | nanoGPT tokens/s (MFU) | noodle tokens/s (MFU) | ratio | nanoGPT GiB "
        "| noodle GiB | predicted noodle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in ratio_rows:
        ours, theirs = results.get(row), results.get(replace(row, variant=REFERENCE))
        ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if ours and theirs else "—"
        print(
            f"| {row.shape} | {row.batch} | {rate(theirs)} | {rate(ours)} | {ratio} "
            f"| {memory(theirs)} | {memory(ours)} | {predicted(row)} |"
        )
    print(
        "\n| shape | batch | variant | loss chunk | tokens/s (MFU) | vs default | peak GiB "
        "| step ms | warm-up s | predicted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, result in results.items():
        base = results.get(replace(row, variant="default"))
        versus = (
            f"{result['tokens_per_s'] / base['tokens_per_s']:.3f}"
            if base and row.variant not in ("default", REFERENCE)
            else ""
        )
        print(
            f"| {row.shape} | {row.batch} | {row.variant} | {result.get('loss_chunk', '')} "
            f"| {rate(result)} | {versus} | {memory(result)} | {result['step_ms']} "
            f"| {result['warmup_s']} | {predicted(row)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--shapes",
        default="gpt2:16,somen:64,28x1024:8,soba:8,somen:8",
        help="SHAPE:BATCH,... of the ratio table (our default step, and nanoGPT's with "
        "--nanogpt); a shape is one of the names above or a CONFIG.json",
    )
    parser.add_argument(
        "--variants", default="", help="further rows of our step: SHAPE:BATCH:VARIANT,..."
    )
    parser.add_argument(
        "--define",
        action="append",
        default=[],
        help="a variant NAME:key=value,... (TrainSettings fields, dropout, inductor.NAME)",
    )
    parser.add_argument("--nanogpt", type=Path, help="folder holding nanoGPT's model.py")
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--dropout", type=float, help="instead of each shape's own")
    parser.add_argument(
        "--compile-mode", default=TrainSettings.compile_mode, help="torch.compile mode"
    )
    parser.add_argument("--budget-s", type=float, help="start no row after this many seconds")
    parser.add_argument("--json", help="also write the rows to this file (after every row)")
    args = parser.parse_args()
    started = time.monotonic()
    device = select_device(args.device)
    variants = dict(VARIANTS)
    variants.update(parse_variant(spec) for spec in args.define)
    ratio_rows = [Row.parse(spec) for spec in args.shapes.split(",") if spec]
    nanogpt = load_nanogpt(args.nanogpt) if args.nanogpt else None
    extra_rows = [Row.parse(spec) for spec in args.variants.split(",") if spec]
    # Each shape's variants right after its ratio rows: a budget cuts whole shapes.
    plan: list[Row] = []
    for row in ratio_rows:
        if nanogpt and nanogpt_equivalent(shape_config(row.shape)):
            plan.append(replace(row, variant=REFERENCE))
        plan.append(row)
        plan += [r for r in extra_rows if (r.shape, r.batch) == (row.shape, row.batch)]
    plan += [r for r in extra_rows if r not in plan]
    for row in plan:
        if row.variant != REFERENCE and row.variant not in variants:
            raise SystemExit(f"error: unknown variant {row.variant!r}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"device {name} | torch {torch.__version__} | {date} | {args.steps} timed steps "
        f"after {args.warmup} | dropout {args.dropout if args.dropout is not None else 'preset'}",
        flush=True,
    )
    results: dict[Row, dict] = {}
    rows_out, skipped = [], []
    for row in plan:
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            skipped.append(row)
            continue
        release(device)
        if row.variant == REFERENCE:
            result = measure_nanogpt(
                nanogpt, row, args.steps, args.warmup, device, args.dropout or 0.0
            )
        else:
            result = measure(
                row,
                variants[row.variant],
                args.compile == "on",
                args.steps,
                args.warmup,
                device,
                args.dropout,
                args.compile_mode,
            )
        results[row] = result
        rows_out.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
        if args.json:
            report = {"device": name, "torch": torch.__version__, "rows": rows_out}
            Path(args.json).write_text(json.dumps(report, indent=1))
    print_tables(results, ratio_rows)
    if skipped:
        print(
            "\nskipped (past --budget-s): "
            + ", ".join(f"{r.shape}:{r.batch}:{r.variant}" for r in skipped)
        )
    print(f"\nwhole run {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

"""A model's loss on batches (`evaluate`, which training uses too), and `noodle eval`:
loss, perplexity and bits per byte on a corpus.

The whole corpus is cut into non-overlapping windows of ctx_len inputs, evaluated in
batches; the tokens evaluated are the windows' targets, i.e. tokens 1 .. windows × ctx_len
of the stream, and bits per byte divides their total loss in bits by the UTF-8 bytes of
exactly those tokens' text.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import decoders

from noodle.batching import Batch, TokenWindows, to_device
from noodle.corpus import load_token_stream
from noodle.device import autocast, describe_device, select_device, select_dtype
from noodle.errors import NoodleError
from noodle.inference import load_for_inference
from noodle.loss import IGNORE
from noodle.progress import Reporter
from noodle.tokenizer import TextTokenizer

# Byte counts are summed over the token stream this many tokens at a time (bounded memory).
COUNT_CHUNK = 1 << 22
MAX_EXP_ARGUMENT = math.log(sys.float_info.max)  # a diverged model can exceed it


@torch.no_grad()
def loss_sums(
    model: torch.nn.Module, batches: Iterable[Batch], device: torch.device, amp_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total cross-entropy and the number of predicted tokens over `batches` (targets of
    IGNORE predict nothing), as device tensors. A batch may be empty (a process's share
    of a small one): it adds nothing, but the model still runs, as sharded models need."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for batch in batches:
        inputs, targets = to_device(batch, device)
        predicted = (targets != IGNORE).sum()
        with autocast(device, amp_dtype):
            loss = model(inputs, targets)
        total += torch.where(predicted > 0, loss.double() * predicted, 0.0)
        count += predicted
    model.train(was_training)
    return total, count


def evaluate(
    model: torch.nn.Module, batches: Iterable[Batch], device: torch.device, amp_dtype: torch.dtype
) -> float:
    """Mean cross-entropy per predicted token over `batches`. Sums stay on the device: one
    host read at the end."""
    total, count = loss_sums(model, batches, device, amp_dtype)
    return float(total) / max(int(count), 1)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    tokens_per_second: float

    def to_json(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        return "\n".join(
            [
                f"loss             {self.loss:.4f}",
                f"perplexity       {self.perplexity:.2f}",
                f"bits per byte    {self.bits_per_byte:.4f}",
                f"tokens           {self.tokens:,}",
                f"tokens/s         {self.tokens_per_second:,.0f}",
            ]
        )


def token_byte_lengths(tokenizer: TextTokenizer) -> np.ndarray:
    """UTF-8 bytes of each token id's text.

    A byte-level BPE token's string spells one byte per character, so its length is its
    byte count, exact even for tokens holding part of a multi-byte character (decoding such
    a token alone would give U+FFFD). Added tokens (`<|endoftext|>`, runs of spaces) are
    plain text. Other tokenizers fall back to decoding each token alone.
    """
    backend = tokenizer.backend
    added = {i: token.content for i, token in backend.get_added_tokens_decoder().items()}
    byte_level = isinstance(backend.decoder, decoders.ByteLevel)
    lengths = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token_id in range(len(lengths)):
        if token_id in added:
            lengths[token_id] = len(added[token_id].encode("utf-8"))
        elif byte_level:
            lengths[token_id] = len(backend.id_to_token(token_id) or "")
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def text_bytes(tokens: np.ndarray, byte_lengths: np.ndarray) -> int:
    """UTF-8 bytes of the text that `tokens` spell."""
    return sum(
        int(byte_lengths[np.asarray(tokens[start : start + COUNT_CHUNK])].sum())
        for start in range(0, len(tokens), COUNT_CHUNK)
    )


def corpus_windows(tokens: np.ndarray, ctx_len: int, batch_size: int, source: str) -> TokenWindows:
    windows = TokenWindows(tokens, ctx_len, batch_size)
    if windows.count == 0:
        raise NoodleError(
            f"corpus {source} too small to evaluate: it has {len(tokens):,} tokens, one "
            f"window of {ctx_len} needs {ctx_len + 1:,}"
        )
    return windows


def evaluate_windows(
    model: torch.nn.Module,
    windows: TokenWindows,
    byte_lengths: np.ndarray,
    device: torch.device,
    amp_dtype: torch.dtype,
    reporter: Reporter,
) -> EvalResult:
    """Every window, in order, in batches of the windows' batch size."""
    n_batches = math.ceil(windows.count / windows.batch_size)
    task = reporter.start_task("evaluating", total=n_batches, unit="batches")

    def batches() -> Iterator[Batch]:
        for start in range(0, windows.count, windows.batch_size):
            yield windows.windows(np.arange(start, min(start + windows.batch_size, windows.count)))
            task.advance(1)

    started = time.perf_counter()
    loss = evaluate(model, batches(), device, amp_dtype)  # returns after a device sync
    elapsed = max(time.perf_counter() - started, 1e-9)
    task.finish()
    n_tokens = windows.count * windows.ctx_len
    targets = windows.tokens[1 : n_tokens + 1]
    bits = loss / math.log(2) * n_tokens
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss) if loss < MAX_EXP_ARGUMENT else math.inf,
        bits_per_byte=bits / max(text_bytes(targets, byte_lengths), 1),
        tokens=n_tokens,
        tokens_per_second=n_tokens / elapsed,
    )


def evaluate_model(
    model_spec: str,
    corpus: str,
    batch_size: int,
    reporter: Reporter,
    backend: str | None = None,
    dtype: str = "auto",
    use_cache: bool = True,
) -> EvalResult:
    device = select_device(backend)
    amp_dtype = select_dtype(dtype, device)
    loaded = load_for_inference(model_spec, "to evaluate", device, reporter.warn, batch_size)
    tokens = load_token_stream(corpus, loaded.tokenizer, reporter, use_cache)
    windows = corpus_windows(tokens, loaded.config.ctx_len, batch_size, corpus)
    reporter.info(
        f"evaluating {loaded.directory} on {corpus}: {windows.count:,} windows of "
        f"{loaded.config.ctx_len} tokens | device {describe_device(device)} | precision "
        f"{str(amp_dtype).removeprefix('torch.')}"
    )
    byte_lengths = token_byte_lengths(loaded.tokenizer)
    return evaluate_windows(loaded.model, windows, byte_lengths, device, amp_dtype, reporter)

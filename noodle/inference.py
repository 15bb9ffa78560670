"""An inference session: one conversation's tokens, the key/value cache that covers them and
the device they live on."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from noodle.model import NoodleModel
from noodle.sampling import SamplingSettings, sample_next
from noodle.tokenizer import TextTokenizer


def prepare_for_inference(model: NoodleModel, dtype: torch.dtype) -> NoodleModel:
    """Cast the weights once to the inference precision (no per-operation autocast) and,
    for float32 on CPU, store every Linear weight input-major.

    Generating a token multiplies each weight matrix by one vector. MKL does that faster
    when the matrix is stored input-major (the transpose of nn.Linear's layout): 1.9 ms
    against 5.2 ms for somen's 256 x 50,304 output layer on the benchmark machine
    (benchmarks/RESULTS.md). The shapes stay the same; only the strides change. bfloat16
    and float16 are the other way round, so they keep nn.Linear's layout.
    """
    # The rotary tables stay float32, as in the autocast training the model learnt with;
    # rounding them to bfloat16 as well made greedy decoding part from float32 a little
    # sooner (9 rather than 10 of 16 prompts agreeing for 50 tokens, RESULTS.md).
    rotary_tables = model.rope_cos, model.rope_sin
    model.to(dtype=dtype)
    model.rope_cos, model.rope_sin = rotary_tables
    if dtype == torch.float32 and model.head.weight.device.type == "cpu":
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


class Session:
    """Runs a conversation through the model, one cached position per new token.

    Tokens are pushed into the history first and run through the model when the next
    token's logits are needed: a prompt in one pass (prefill), a generated token as one
    position (decode). When the history outgrows the context window, the oldest half of
    the window is dropped and the cache rebuilt from what remains.
    """

    def __init__(
        self, model: NoodleModel, tokenizer: TextTokenizer, compile_decode: bool = False
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = model.head.weight.device
        self.ctx_len = model.config.ctx_len
        self.history: list[int] = []  # every token of the conversation
        self.window_start = 0  # history[window_start:] is what the model attends to
        self.cached = 0  # how many tokens of the window have keys/values in the cache
        # The window's ids on the device, as the repetition penalty's context, so they are
        # not copied over from the history list for every token.
        self.window_ids = torch.zeros(self.ctx_len, dtype=torch.long, device=self.device)
        model.eval()
        model.setup_cache(1)
        # Only the one-token step is compiled: its shapes never change, so it is captured
        # once (with CUDA graphs: one launch per token instead of one per operation).
        self.decode_step = (
            torch.compile(model, mode="reduce-overhead", fullgraph=True) if compile_decode else None
        )

    def reset(self) -> None:
        """Forget the conversation; the cache is reused."""
        self.history, self.window_start, self.cached = [], 0, 0

    def warm_up(self) -> None:
        """Run a few decode steps and forget them, so that compiling (and capturing CUDA
        graphs) happens now rather than in the middle of the first reply."""
        self.push([self.tokenizer.eot_id])
        for _ in range(3):
            self.next_token(SamplingSettings(temperature=0))
        self.reset()

    @property
    def window(self) -> list[int]:
        return self.history[self.window_start :]

    def push(self, ids: list[int]) -> None:
        """Add tokens to the conversation; the next `logits()` runs the model over them."""
        self.history.extend(ids)

    def push_text(self, text: str) -> None:
        """Add the tokens of `text` to the conversation."""
        ids = self.tokenizer.encode(text)
        if not ids and not self.history:
            ids = [self.tokenizer.eot_id]  # an empty conversation starts at a document boundary
        self.push(ids)

    def discard_last(self) -> int:
        """Drop the last token, e.g. the one a caller stopped on, leaving no trace of it:
        a cached copy of it is overwritten by whatever comes next."""
        if not self.history:
            raise ValueError("the conversation is empty: there is no token to discard")
        token = self.history.pop()
        self.window_start = min(self.window_start, len(self.history))
        self.cached = min(self.cached, len(self.history) - self.window_start)
        return token

    def evict(self) -> None:
        """Drop the oldest half of the window, as often as needed for the history to fit.

        Halving (rather than dropping just enough) means the cache is rebuilt once every
        half window of new tokens, not for every token once the window is full. Positions
        restart at 0 in the rebuilt cache; rotary attention only sees relative distances.
        """
        half = max(1, self.ctx_len // 2)
        overflow = len(self.history) - self.window_start - self.ctx_len
        self.window_start += -(-overflow // half) * half
        self.cached = 0

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Bring the cache up to date with the history; the logits that follow its last token.

        Interrupting this (Ctrl-C) leaves the session consistent: `cached` only counts
        positions once they are written.
        """
        if len(self.history) - self.window_start > self.ctx_len:
            self.evict()
        window = len(self.history) - self.window_start
        if window == 0:
            raise ValueError("the conversation is empty: push a prompt first")
        if self.cached == window:
            self.cached -= 1  # nothing new since the last call: recompute the last position
        start = self.cached
        ids = torch.tensor(self.history[self.window_start + start :], device=self.device)
        self.window_ids[start:window] = ids
        if self.decode_step is not None and len(ids) == 1:
            position = torch.tensor(start, device=self.device)
            logits = self.decode_step(ids.view(1, 1), start=position)[0, -1]
        else:
            # Only the last position's logits are needed: a prompt (or a rebuilt cache) of
            # n tokens skips n - 1 rows of the output layer, the largest matrix product.
            hidden = self.model.hidden_states(ids.view(1, -1), start=start)
            logits = self.model.head(hidden[0, -1])
        self.cached = window
        return logits

    def next_token(
        self, settings: SamplingSettings, generator: torch.Generator | None = None
    ) -> int:
        """Sample the token that follows the history and append it (not yet run through the
        model: a caller that stops on it can `discard_last()` it for free)."""
        logits = self.logits()
        context = self.window_ids[: self.cached]
        token = sample_next(logits, settings, context, generator, self.tokenizer.vocab_size)
        self.history.append(token)
        return token

    def sample(
        self,
        max_tokens: int,
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield the tokens that follow the history until end-of-text or `max_tokens`; each
        is in the history when yielded. End-of-text is not yielded and does not stay."""
        for _ in range(max_tokens):
            token = self.next_token(settings, generator)
            if token == self.tokenizer.eot_id:
                self.discard_last()
                return
            yield token


def generate(
    session: Session,
    prompt: str,
    max_tokens: int,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield generated token ids after `prompt` until end-of-text or `max_tokens`."""
    session.push_text(prompt)
    yield from session.sample(max_tokens, settings, generator)

"""A model directory loaded for inference (chat, eval), and an inference session: one
conversation's tokens, the key/value cache that covers them and the device they live on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch

from noodle.checkpoint import LoadedModel, load_weights, open_model_dir, unfinished_run_warning
from noodle.footprint import require_inference_memory
from noodle.model import NoodleModel
from noodle.precision import Float16Linear
from noodle.sampling import SamplingSettings, noise_size, sample_next, sample_with_noise
from noodle.tokenizer import TextTokenizer


def load_for_inference(
    spec: str,
    purpose: str,
    device: torch.device,
    warn: Callable[[str], None],
    batch_size: int = 0,
) -> LoadedModel:
    """The model of directory `spec` on `device`, refused before its weights are read where
    it cannot fit `purpose` (to chat: batch_size 0, or to evaluate batches of batch_size;
    see `footprint`). `warn` is told when the weights come from a run that did not finish."""
    files = open_model_dir(spec)
    require_inference_memory(files.config, f"model {files.directory}", purpose, device, batch_size)
    loaded = load_weights(files, device)
    warning = unfinished_run_warning(loaded.directory, loaded.metadata)
    if warning:
        warn(warning)
    return loaded


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
        self.device = model.tok_emb.weight.device
        self.ctx_len = model.config.ctx_len
        self.history: list[int] = []  # every token of the conversation
        self.window_start = 0  # history[window_start:] is what the model attends to
        self.cached = 0  # how many tokens of the window have keys/values in the cache
        # The window's ids on the device, as the repetition penalty's context, so they are
        # not copied over from the history list for every token.
        self.window_ids = torch.zeros(self.ctx_len, dtype=torch.long, device=self.device)
        model.eval()
        model.setup_cache(1)
        # With compile_decode, decoding a token and choosing the next one is one compiled
        # step of fixed shapes, captured once as a CUDA graph: a token costs four tiny
        # writes of its inputs (which stay at fixed addresses), one graph launch and one
        # read of the chosen id, instead of ~100 launches and their Python.
        if compile_decode and any(isinstance(m, Float16Linear) for m in model.modules()):
            raise ValueError("a model with FBGEMM-packed weights cannot be compiled")
        self.compile_decode = compile_decode
        # None for settings whose step the compiler gave up on (see compiled_next_token).
        self.decode_steps: dict[SamplingSettings, tuple[Callable, torch.Tensor] | None] = {}
        self.position = torch.zeros((), dtype=torch.long, device=self.device)
        self.window_length_tensor = torch.zeros((), dtype=torch.long, device=self.device)
        if compile_decode:
            for tensor in (self.window_ids, self.position, self.window_length_tensor):
                torch._dynamo.mark_static_address(tensor)

    def reset(self) -> None:
        """Forget the conversation; the cache is reused."""
        self.history, self.window_start, self.cached = [], 0, 0

    def warm_up(self, settings: SamplingSettings) -> None:
        """Run a few decode steps and forget them, so that compiling (and capturing CUDA
        graphs) for these settings happens now rather than in the middle of the first reply."""
        self.push([self.tokenizer.eot_id])
        for _ in range(3):
            self.next_token(settings)
        self.reset()

    @property
    def window(self) -> list[int]:
        return self.history[self.window_start :]

    @property
    def window_length(self) -> int:
        return len(self.history) - self.window_start

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
        self.cached = min(self.cached, self.window_length)
        return token

    def evict(self) -> None:
        """Drop the oldest half of the window, as often as needed for the history to fit.

        Halving (rather than dropping just enough) means the cache is rebuilt once every
        half window of new tokens, not for every token once the window is full. Positions
        restart at 0 in the rebuilt cache; rotary attention only sees relative distances.
        """
        half = max(1, self.ctx_len // 2)
        overflow = self.window_length - self.ctx_len
        self.window_start += -(-overflow // half) * half
        self.cached = 0

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Bring the cache up to date with the history; the logits that follow its last token.

        Interrupting this (Ctrl-C) leaves the session consistent: `cached` only counts
        positions once they are written.
        """
        if self.window_length > self.ctx_len:
            self.evict()
        window = self.window_length
        if window == 0:
            raise ValueError("the conversation is empty: push a prompt first")
        if self.cached == window:
            self.cached -= 1  # nothing new since the last call: recompute the last position
        start = self.cached
        ids = torch.tensor(self.history[self.window_start + start :], device=self.device)
        self.window_ids[start:window] = ids
        # Only the last position's logits are needed: a prompt (or a rebuilt cache) of n
        # tokens skips n - 1 rows of the output layer, the largest matrix product.
        hidden = self.model.hidden_states(ids.view(1, -1), start=start)
        logits = self.model.head(hidden[0, -1:])[0]
        self.cached = window
        return logits

    def decode_step(self, settings: SamplingSettings) -> tuple[Callable, torch.Tensor] | None:
        """The compiled decode-and-choose step for these settings, and its noise buffer."""
        if settings not in self.decode_steps:
            vocab_limit = self.tokenizer.vocab_size
            step = torch.compile(
                partial(decode_and_choose, self.model, settings, vocab_limit),
                mode="reduce-overhead",
                fullgraph=True,
                dynamic=False,
            )
            noise = torch.zeros(noise_size(settings, vocab_limit), device=self.device)
            torch._dynamo.mark_static_address(noise)
            self.decode_steps[settings] = step, noise
        return self.decode_steps[settings]

    @torch.no_grad()
    def compiled_next_token(
        self, settings: SamplingSettings, generator: torch.Generator | None
    ) -> int | None:
        """`next_token` through the compiled step, when one token awaits its cached
        position; None where there is no compiled step for these settings."""
        compiled = self.decode_step(settings)
        if compiled is None:
            return None
        step, noise = compiled
        window = self.window_length
        # In-place scalar writes: no host-to-device copies, and the step's inputs stay put.
        self.window_ids[self.cached] = self.history[-1]
        self.position.fill_(self.cached)
        self.window_length_tensor.fill_(window)
        noise.uniform_(generator=generator)
        try:
            token = int(step(self.window_ids, self.position, self.window_length_tensor, noise))
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # The compiler keeps a bounded number of versions of one function per process
            # (one per set of sampling settings and model shape); past it, decode eagerly.
            self.decode_steps[settings] = None
            return None
        self.cached = window
        return token

    def next_token(
        self, settings: SamplingSettings, generator: torch.Generator | None = None
    ) -> int:
        """Sample the token that follows the history and append it (not yet run through the
        model: a caller that stops on it can `discard_last()` it for free)."""
        window = self.window_length
        token = None
        if self.compile_decode and 0 < window <= self.ctx_len and self.cached == window - 1:
            token = self.compiled_next_token(settings, generator)
        if token is None:
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


def decode_and_choose(
    model: NoodleModel,
    settings: SamplingSettings,
    vocab_limit: int,
    window_ids: torch.Tensor,
    position: torch.Tensor,
    window_len: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Run the token at window_ids[position] through the cached model and choose the next
    token, all on the device with fixed shapes: the function `Session` compiles."""
    ids = window_ids.index_select(0, position.view(1)).view(1, 1)
    logits = model(ids, start=position)[0, -1]
    return sample_with_noise(logits, settings, window_ids, window_len, uniform, vocab_limit)


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

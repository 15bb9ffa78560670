"""An inference session: a conversation's tokens and the key/value cache that covers them."""

from __future__ import annotations

import torch

from noodle.model import NoodleModel
from noodle.sampling import SamplingSettings, sample_next
from noodle.tokenizer import TextTokenizer


class Session:
    """Feeds tokens through the model with a key/value cache.

    New tokens cost one cached position each. When the history would outgrow the context
    window, its oldest half is dropped and the cache rebuilt from what remains.
    """

    def __init__(
        self, model: NoodleModel, tokenizer: TextTokenizer, dtype: torch.dtype | None = None
    ):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.head.weight.device
        self.ctx_len = model.config.ctx_len
        self.history: list[int] = []
        self.cached = 0  # positions of `history` whose keys/values are in the cache
        model.eval()
        model.setup_cache(1, dtype)

    @torch.no_grad()
    def feed(self, ids: list[int]) -> torch.Tensor:
        """Append `ids` to the history; returns the logits that follow the last one."""
        if not ids:
            raise ValueError("feed needs at least one token")
        self.history.extend(ids)
        if len(self.history) > self.ctx_len:
            keep = max(1, self.ctx_len // 2, len(ids) if len(ids) <= self.ctx_len else 0)
            self.history = self.history[-keep:]
            self.cached = 0
        new = torch.tensor([self.history[self.cached :]], device=self.device)
        logits = self.model(new, start=self.cached)
        self.cached = len(self.history)
        return logits[0, -1]

    def discard_last(self) -> None:
        """Forget the last token, e.g. an end-of-text the caller stopped on."""
        if self.history:
            self.history.pop()
            self.cached = min(self.cached, len(self.history))

    def reset(self) -> None:
        self.history, self.cached = [], 0


def generate(
    session: Session,
    prompt: str,
    max_tokens: int,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
):
    """Yield generated token ids after `prompt` until end-of-text or `max_tokens`.

    The end-of-text token is not yielded and does not stay in the history.
    """
    tokenizer = session.tokenizer
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    logits = session.feed(ids)
    for _ in range(max_tokens):
        context = torch.tensor(session.history[-session.ctx_len :])
        token = sample_next(logits, settings, context, generator, tokenizer.vocab_size)
        if token == tokenizer.eot_id:
            return
        yield token
        logits = session.feed([token])

"""Choosing the next token from logits: temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from noodle.errors import UsageError


@dataclass(frozen=True)
class SamplingSettings:
    """temperature <= 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise UsageError(f"top-k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition penalty must be positive, got {self.repetition_penalty}")


def apply_repetition_penalty(
    logits: torch.Tensor, context: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make tokens already in the context less likely: divide positive logits by the
    penalty, multiply negative ones. Modifies `logits` in place and returns it."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    # A token seen twice gets the same new value written twice, so no need for unique().
    seen = logits[context]
    logits[context] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits and their ids, largest first. topk selects them without
    sorting the whole vocabulary; k of 0 (or the whole vocabulary) sorts everything."""
    if 0 < k < logits.numel():
        return torch.topk(logits, k)
    return torch.sort(logits, descending=True)


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    context: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> int:
    """One token id from the logits of one position. `context` holds the ids (all below
    vocab_limit) the repetition penalty applies to; ids >= vocab_limit (the padding of the
    model's vocabulary) are never returned."""
    # A float32 copy: the penalty works in place, and bfloat16 logits are too coarse for it.
    logits = logits[:vocab_limit].to(torch.float32, copy=True)
    if context is not None:
        apply_repetition_penalty(logits, context, settings.repetition_penalty)
    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    values, ids = top_k_candidates(logits, settings.top_k)
    # Temperature does not change the ranking, so it is applied to the candidates only.
    probs = torch.softmax(values / settings.temperature, dim=-1)
    if settings.top_p < 1:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = torch.cumsum(probs, dim=-1) - probs >= settings.top_p
        probs = probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(ids[choice])

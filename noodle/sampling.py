"""Choosing the next token from logits: temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1


def apply_repetition_penalty(
    logits: torch.Tensor, context: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make tokens already in the context less likely: divide positive logits by the
    penalty, multiply negative ones."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = torch.unique(context)
    values = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    context: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> int:
    """One token id from the logits of one position. Ids >= vocab_limit (the padding of
    the model's vocabulary) are never returned."""
    logits = logits[:vocab_limit].float()
    if context is not None:
        logits = apply_repetition_penalty(
            logits, context.to(logits.device), settings.repetition_penalty
        )
    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / settings.temperature
    if settings.top_k and 0 < settings.top_k < logits.numel():
        # topk selects (and sorts) only k values instead of sorting the whole vocabulary.
        values, indices = torch.topk(logits, settings.top_k)
    else:
        values, indices = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    if 0 < settings.top_p < 1:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = torch.cumsum(probs, dim=-1) - probs >= settings.top_p
        probs = probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])

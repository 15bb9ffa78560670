"""Choosing the next token from logits: temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import math
from collections.abc import Callable
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
        if not math.isfinite(self.temperature):
            raise UsageError(f"temperature must be a finite number, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise UsageError(
                "repetition penalty must be a positive finite number, got "
                f"{self.repetition_penalty}"
            )


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


def choose(
    logits: torch.Tensor,
    settings: SamplingSettings,
    draw: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The chosen id (a tensor) from penalized float32 logits: greedy at temperature <= 0,
    else `draw(probs)` picks an index among the top-k / top-p candidates' probabilities."""
    if settings.temperature <= 0:
        return torch.argmax(logits)
    values, ids = top_k_candidates(logits, settings.top_k)
    # Temperature does not change the ranking, so it is applied to the candidates only.
    probs = torch.softmax(values / settings.temperature, dim=-1)
    if settings.top_p < 1:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = torch.cumsum(probs, dim=-1) - probs >= settings.top_p
        probs = probs.masked_fill(outside, 0.0)
    # index_select rather than ids[choice]: the same graph whatever the choice.
    return ids.index_select(0, draw(probs).view(1))[0]


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

    def draw(probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=generator)

    return int(choose(logits, settings, draw))


def noise_size(settings: SamplingSettings, vocab_limit: int) -> int:
    """How many uniform numbers `sample_with_noise` draws with: one per candidate (greedy
    choosing uses none; it gets one to keep the shapes uniform)."""
    if settings.temperature <= 0:
        return 1
    return settings.top_k if 0 < settings.top_k < vocab_limit else vocab_limit


def sample_with_noise(
    logits: torch.Tensor,
    settings: SamplingSettings,
    window_ids: torch.Tensor,
    window_len: torch.Tensor,
    uniform: torch.Tensor,
    vocab_limit: int,
) -> torch.Tensor:
    """`sample_next` with static shapes and the randomness passed in (`uniform`: U[0, 1),
    `noise_size` of them), so that a decode step and its sampling compile into one graph.

    The repetition penalty's context is window_ids[:window_len] (a tensor length); the ids
    past it are sent to a spare slot after the vocabulary instead of being sliced off.
    """
    logits = torch.cat([logits[:vocab_limit].float(), logits.new_zeros(1, dtype=torch.float32)])
    in_window = torch.arange(window_ids.numel(), device=window_ids.device) < window_len
    apply_repetition_penalty(
        logits, torch.where(in_window, window_ids, vocab_limit), settings.repetition_penalty
    )

    # An exponential race: argmax of p_i / E_i with E_i ~ Exp(1) picks i with probability p_i.
    def draw(probs: torch.Tensor) -> torch.Tensor:
        return torch.argmax(probs / -torch.log(uniform))

    return choose(logits[:vocab_limit], settings, draw)

"""Sampling: greedy, top-k, top-p, repetition penalty, seeds and the padded vocabulary."""

from __future__ import annotations

import pytest
import torch

from noodle.errors import UsageError
from noodle.sampling import (
    SamplingSettings,
    apply_repetition_penalty,
    noise_size,
    sample_next,
    sample_with_noise,
    top_k_candidates,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spread_logits(size: int = 50304, seed: int = 0) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 3


def draws(
    logits: torch.Tensor, settings: SamplingSettings, seed: int, count: int = 50, **kwargs
) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [sample_next(logits, settings, generator=generator, **kwargs) for _ in range(count)]


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_returns_the_argmax(temperature):
    logits = spread_logits()
    logits[777] = 100.0
    assert sample_next(logits, SamplingSettings(temperature=temperature)) == 777


def test_top_k_of_one_pins_the_sample():
    logits = spread_logits()
    settings = SamplingSettings(temperature=5.0, top_k=1, top_p=1.0)
    for seed in range(10):
        assert set(draws(logits, settings, seed, count=10)) == {int(logits.argmax())}


def test_top_k_selection_equals_a_full_sort():
    logits = spread_logits()
    values, ids = top_k_candidates(logits, 40)
    sorted_values, sorted_ids = torch.sort(logits, descending=True)
    assert torch.equal(values, sorted_values[:40])
    assert torch.equal(ids, sorted_ids[:40])


def test_top_k_samples_only_among_the_k_likeliest():
    logits = spread_logits()
    allowed = set(torch.topk(logits, 5).indices.tolist())
    settings = SamplingSettings(temperature=100.0, top_k=5, top_p=1.0)
    sampled = set(draws(logits, settings, seed=1, count=200))
    assert sampled <= allowed
    assert len(sampled) > 1  # a high temperature spreads the draws over the five


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=0.7)
    # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it, so token 2 and 3 are out.
    assert set(draws(logits, settings, seed=2, count=200)) == {0, 1}


def test_same_seed_same_sample():
    logits = spread_logits(4096)
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0)
    assert draws(logits, settings, seed=5) == draws(logits, settings, seed=5)
    assert draws(logits, settings, seed=5) != draws(logits, settings, seed=6)


def test_padded_vocabulary_ids_are_never_produced():
    logits = spread_logits(512)
    logits[500:] = 1000.0  # the padding rows of an untrained output layer can be anything
    greedy = SamplingSettings(temperature=0)
    assert sample_next(logits, greedy, vocab_limit=500) < 500
    wide = SamplingSettings(temperature=100.0, top_k=0, top_p=1.0)
    assert max(draws(logits, wide, seed=3, count=200, vocab_limit=500)) < 500


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 3.0, -1.0])
    context = torch.tensor([0, 1, 1])  # token 1 twice: penalised once
    penalised = apply_repetition_penalty(logits.clone(), context, 2.0)
    assert penalised.tolist() == [1.0, -4.0, 3.0, -1.0]


def test_repetition_penalty_can_change_the_greedy_choice():
    logits = torch.tensor([2.0, 1.5, -1.0])
    greedy = SamplingSettings(temperature=0, repetition_penalty=1.5)
    assert sample_next(logits, greedy, context=torch.tensor([0])) == 1
    assert logits.tolist() == [2.0, 1.5, -1.0]  # the caller's logits are left alone


@pytest.mark.parametrize(
    "field, value", [("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0)]
)
def test_invalid_settings_are_usage_errors(field, value):
    with pytest.raises(UsageError):
        SamplingSettings(**{field: value})


def test_noise_sampling_draws_what_sample_next_draws():
    """The compiled decode path samples by an exponential race over passed-in noise, with a
    tensor window length: each candidate must come out as often as with sample_next."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, 3.0])
    settings = SamplingSettings(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3)
    window = torch.tensor([7, 1, 0, 0])  # tokens 7 and 1 seen; the last two slots unused
    length = torch.tensor(2)
    generator = torch.Generator().manual_seed(1)
    noisy, reference = torch.zeros(8), torch.zeros(8)
    draws = 6000
    for _ in range(draws):
        uniform = torch.rand(noise_size(settings, 8), generator=generator)
        noisy[int(sample_with_noise(logits, settings, window, length, uniform, 8))] += 1
        reference[sample_next(logits, settings, window[:2], generator, 8)] += 1
    assert (noisy / draws - reference / draws).abs().max() < 0.03
    assert noisy[5:7].sum() == 0  # outside the top 5: never drawn
    greedy = SamplingSettings(temperature=0, repetition_penalty=1.0)
    assert int(sample_with_noise(logits, greedy, window, length, torch.rand(8), 8)) == 7

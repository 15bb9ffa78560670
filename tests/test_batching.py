"""The training/validation split of a token stream: validation spread over the whole corpus,
fixed by the seed, a tenth of the windows, never sharing a token with training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noodle.batching import minimum_corpus_tokens, share_of, split_fits, split_windows
from noodle.errors import NoodleError

CTX = 16


def positions(n_tokens: int, seed: int = 7, batch_size: int = 4):
    """The split of a stream whose every token is its own position, so a batch's values
    say where its windows start."""
    tokens = np.arange(n_tokens, dtype=np.int64)
    return split_windows(tokens, CTX, batch_size, seed)


def window_starts(windows) -> np.ndarray:
    """The first token of each window the split reads, through the batches themselves."""
    inputs, targets = windows.windows(np.arange(windows.count))
    assert (targets[:, :-1] == inputs[:, 1:]).all()
    return inputs[:, 0].numpy()


def covered_tokens(starts: np.ndarray) -> set[int]:
    """Every token a window reads, its inputs and its targets (ctx_len + 1 tokens)."""
    return {int(s) + offset for s in starts for offset in range(CTX + 1)}


@pytest.mark.parametrize("n_windows", [21, 40, 333, 1000, 4321])
def test_a_tenth_is_held_out_and_training_shares_no_token_with_validation(n_windows):
    train, val = positions(n_windows * CTX + 1 + CTX // 2)
    train_starts, val_starts = window_starts(train), window_starts(val)
    held_out = -(-n_windows // 10)
    assert train.count == n_windows - held_out
    # Of the held-out windows, two per block of at most 32 go unused (the block's ends).
    assert val.count == held_out - 2 * -(-held_out // 32)
    assert not covered_tokens(train_starts) & covered_tokens(val_starts)
    # Every window is whole, on the grid of ctx_len, and read once.
    assert len(set(train_starts) | set(val_starts)) == train.count + val.count
    assert all(s % CTX == 0 and s + CTX < n_windows * CTX + 1 for s in train_starts)


def test_validation_is_spread_over_the_whole_corpus():
    n_windows = 4000
    _, val = positions(n_windows * CTX + 1)
    slots = window_starts(val) // CTX
    # Validation windows in every tenth of the corpus, in the same share everywhere...
    per_tenth = np.bincount(slots * 10 // n_windows, minlength=10)
    assert per_tenth.min() >= 0.7 * val.count / 10
    # ...in blocks a period apart (13 blocks here), not in one stretch.
    gaps = np.diff(slots)
    assert (gaps > 1).sum() == 12
    assert gaps.max() <= 2 * n_windows / 13


def test_the_seed_fixes_where_validation_falls():
    first, again = positions(1000 * CTX + 1, seed=1)[1], positions(1000 * CTX + 1, seed=1)[1]
    assert (window_starts(first) == window_starts(again)).all()
    placements = {tuple(window_starts(positions(1000 * CTX + 1, seed=s)[1])) for s in range(6)}
    assert len(placements) == 6


def test_training_batches_read_only_training_windows_and_evaluation_only_validation():
    train, val = positions(500 * CTX + 1, batch_size=4)
    read = set()
    for index in range(train.batches_per_epoch()):
        inputs, _ = train.get(epoch=2, index=index)
        read |= set(inputs[:, 0].tolist())
    assert read <= set(window_starts(train)) and len(read) == 4 * train.batches_per_epoch()
    evaluated = {int(s) for inputs, _ in val.eval_batches(1000) for s in inputs[:, 0]}
    assert evaluated == set(window_starts(val))


@pytest.mark.parametrize(("ctx_len", "batch_size"), [(64, 8), (16, 1), (256, 64), (1, 1)])
def test_the_minimum_corpus_is_exact(ctx_len, batch_size):
    needed = minimum_corpus_tokens(ctx_len, batch_size)
    tokens = np.zeros(needed, dtype=np.uint16)
    train, val = split_windows(tokens, ctx_len, batch_size, seed=3)
    assert train.batches_per_epoch() >= 1 and val.count >= 1
    with pytest.raises(NoodleError) as error:
        split_windows(tokens[:-1], ctx_len, batch_size, seed=3)
    assert str(error.value) == (
        f"corpus too small: it has {needed - 1:,} tokens, but one training batch "
        f"({batch_size} × {ctx_len}) and one validation window need at least {needed:,}"
    )
    # Every larger corpus fits too, so "at least" is true.
    assert all(split_fits(n, ctx_len, batch_size) for n in range(needed, needed + 40 * ctx_len))


def test_the_processes_shares_of_a_batch_are_contiguous_and_make_it_whole():
    windows = np.arange(8) * 3
    shares = [share_of(windows, rank, 4).tolist() for rank in range(4)]
    assert shares == [[0, 3], [6, 9], [12, 15], [18, 21]]
    # An evaluation batch of fewer rows than processes: one gets none.
    rows = [share_of(torch.arange(3), rank, 4) for rank in range(4)]
    assert torch.cat(rows).tolist() == [0, 1, 2] and sorted(map(len, rows)) == [0, 1, 1, 1]

"""Training and validation batches cut from a flat token array (usually a memory map)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

from noodle.corpus import release_token_pages
from noodle.errors import NoodleError

# One window in this many is held out of training (see `validation_layout`).
VALIDATION_ONE_IN = 10
TRAIN_FRACTION = 1 - 1 / VALIDATION_ONE_IN
# Held-out windows come in blocks of at most this many, the first and last of them unused.
HELD_OUT_BLOCK = 32
# The random stream that places the blocks: (seed, this), beside the epochs' (seed, epoch).
LAYOUT_STREAM = 2**32 - 1

Batch = tuple[torch.Tensor, torch.Tensor]
Items = TypeVar("Items", np.ndarray, torch.Tensor)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A batch on the device; on CUDA copied from pinned memory without waiting."""
    if device.type == "cuda":
        batch = tuple(tensor.pin_memory() for tensor in batch)
    return tuple(tensor.to(device, non_blocking=True) for tensor in batch)


class TokenWindows:
    """Non-overlapping windows of ctx_len inputs (plus the one next token for the targets).

    Each epoch visits every window once in an order drawn from (seed, epoch), so any
    position in the run is named by (epoch, batch index) and can be resumed exactly.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        ctx_len: int,
        batch_size: int,
        seed: int = 0,
        slots: np.ndarray | None = None,
    ):
        self.tokens, self.ctx_len, self.batch_size, self.seed = tokens, ctx_len, batch_size, seed
        # Window i starts at token slots[i] * ctx_len; without slots, every whole window.
        self.slots = slots
        self.count = window_count(len(tokens), ctx_len) if slots is None else len(slots)
        self._order: tuple[int, np.ndarray] | None = None
        self.share = (0, 1)  # see take_share

    def take_share(self, rank: int, ranks: int) -> None:
        """From now on `get` returns process `rank`'s share of each batch (of `ranks`)."""
        self.share = (rank, ranks)

    def batches_per_epoch(self) -> int:
        return self.count // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.count))
        return self._order[1]

    def windows(self, indices: np.ndarray) -> Batch:
        if self.slots is not None:
            indices = self.slots[indices]
        starts = indices.astype(np.int64) * self.ctx_len
        rows = np.stack([self.tokens[s : s + self.ctx_len + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def get(self, epoch: int, index: int) -> Batch:
        chosen = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.windows(share_of(chosen, *self.share))

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        """Evenly spaced windows, at most max_batches batches, the same ones every time."""
        limit = min(self.count, max_batches * self.batch_size)
        chosen = np.linspace(0, self.count - 1, num=limit).round().astype(np.int64)
        for start in range(0, limit, self.batch_size):
            batch = self.windows(chosen[start : start + self.batch_size])
            # Windows all over the corpus: unmap what they (and training since the last
            # evaluation) mapped. Not after every training batch: faults would cost a step
            # ~0.3 ms at 64 x 257 tokens.
            release_token_pages(self.tokens)
            yield batch


def share_of(items: Items, rank: int, ranks: int) -> Items:
    """Process `rank`'s contiguous share of a batch's `items` (window indices, or a tensor's
    rows): every process takes its own part of the same order, together the whole batch.
    Where `ranks` does not divide the items the shares differ by one at most (some may be
    empty)."""
    bounds = np.linspace(0, len(items), ranks + 1).round().astype(int)
    return items[bounds[rank] : bounds[rank + 1]]


def window_count(n_tokens: int, ctx_len: int) -> int:
    """Whole windows of ctx_len inputs (plus the next token) in n_tokens, side by side."""
    return max(0, (n_tokens - 1) // ctx_len)


def held_out_count(windows: int) -> int:
    """The windows held out of training: a tenth, rounded up."""
    return -(-windows // VALIDATION_ONE_IN)


def split_fits(n_tokens: int, ctx_len: int, batch_size: int) -> bool:
    """Whether the split leaves one training batch and one validation window."""
    windows = window_count(n_tokens, ctx_len)
    held_out = held_out_count(windows)
    # A validation window needs a held-out block of three: it and its unused neighbours.
    return windows - held_out >= batch_size and held_out >= 3


def minimum_corpus_tokens(ctx_len: int, batch_size: int) -> int:
    """The fewest tokens whose split holds one training batch and one validation window."""
    # Both the training and the held-out windows only grow with the corpus, so the first
    # window count that fits is the minimum: start from a lower bound and count up.
    windows = batch_size + 1
    while not split_fits(windows * ctx_len + 1, ctx_len, batch_size):
        windows += 1
    return windows * ctx_len + 1


def validation_layout(windows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The slots of the training and of the validation windows, each in corpus order.

    A tenth of the windows is held out, in blocks of at most `HELD_OUT_BLOCK` evenly
    spaced over the whole corpus (the seed sets where the first one falls), so validation
    is the training text's own mix. The first and last window of each block go unused: a
    window's last target is the next window's first input, and without them a training
    window would share that token with a validation window.
    """
    held_out = held_out_count(windows)
    blocks = -(-held_out // HELD_OUT_BLOCK)
    sizes = held_out // blocks + (np.arange(blocks) < held_out % blocks)
    training = windows - held_out
    phase = np.random.default_rng([seed, LAYOUT_STREAM]).random()
    # Block b comes just before the training window numbered before[b], so the j-th
    # held-out window, in block b, sits at slot before[b] + j.
    before = ((np.arange(blocks) + phase) * training / blocks).astype(np.int64)
    held = np.repeat(before, sizes) + np.arange(held_out)
    block_of = np.repeat(np.arange(blocks), sizes)
    in_block = np.arange(held_out) - (np.cumsum(sizes) - sizes)[block_of]
    inner = (in_block > 0) & (in_block < sizes[block_of] - 1)
    is_training = np.ones(windows, dtype=bool)
    is_training[held] = False
    return np.flatnonzero(is_training), held[inner]


def split_windows(
    tokens: np.ndarray, ctx_len: int, batch_size: int, seed: int
) -> tuple[TokenWindows, TokenWindows]:
    """The training and validation windows (see `validation_layout`), or a clear error if
    the corpus is too small."""
    if not split_fits(len(tokens), ctx_len, batch_size):
        needed = minimum_corpus_tokens(ctx_len, batch_size)
        raise NoodleError(
            f"corpus too small: it has {len(tokens):,} tokens, but one training batch "
            f"({batch_size} × {ctx_len}) and one validation window need at least {needed:,}"
        )
    training, validation = validation_layout(window_count(len(tokens), ctx_len), seed)
    return (
        TokenWindows(tokens, ctx_len, batch_size, seed, training),
        TokenWindows(tokens, ctx_len, batch_size, seed, validation),
    )

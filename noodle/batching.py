"""Training and validation batches cut from a flat token array (usually a memory map)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from noodle.errors import NoodleError

TRAIN_FRACTION = 0.9

Batch = tuple[torch.Tensor, torch.Tensor]


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

    def __init__(self, tokens: np.ndarray, ctx_len: int, batch_size: int, seed: int = 0):
        self.tokens, self.ctx_len, self.batch_size, self.seed = tokens, ctx_len, batch_size, seed
        self.count = max(0, (len(tokens) - 1) // ctx_len)
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
            yield self.windows(chosen[start : start + self.batch_size])


def share_of(chosen: np.ndarray, rank: int, ranks: int) -> np.ndarray:
    """Process `rank`'s contiguous share of a global batch's items: every process reads its
    own windows of the same shuffled order, together the whole batch."""
    size = len(chosen) // ranks
    return chosen[rank * size : (rank + 1) * size]


def minimum_corpus_tokens(ctx_len: int, batch_size: int) -> int:
    """The fewest tokens whose 90/10 split holds one training batch and one validation window."""
    # Both bounds are lower bounds (floor), so counting up finds the exact minimum.
    needed = max(
        int((batch_size * ctx_len + 1) / TRAIN_FRACTION),
        int((ctx_len + 1) / (1 - TRAIN_FRACTION)) - 10,
    )
    while not split_fits(needed, ctx_len, batch_size):
        needed += 1
    return needed


def split_point(n_tokens: int) -> int:
    return int(n_tokens * TRAIN_FRACTION)


def split_fits(n_tokens: int, ctx_len: int, batch_size: int) -> bool:
    cut = split_point(n_tokens)
    return cut >= batch_size * ctx_len + 1 and n_tokens - cut >= ctx_len + 1


def split_windows(
    tokens: np.ndarray, ctx_len: int, batch_size: int, seed: int
) -> tuple[TokenWindows, TokenWindows]:
    """The 90/10 train/validation split, or a clear error if the corpus is too small."""
    if not split_fits(len(tokens), ctx_len, batch_size):
        needed = minimum_corpus_tokens(ctx_len, batch_size)
        raise NoodleError(
            f"corpus too small: it has {len(tokens):,} tokens, but one training batch "
            f"({batch_size} × {ctx_len}) and one validation window need at least {needed:,}"
        )
    cut = split_point(len(tokens))
    return (
        TokenWindows(tokens[:cut], ctx_len, batch_size, seed),
        TokenWindows(tokens[cut:], ctx_len, batch_size, seed),
    )

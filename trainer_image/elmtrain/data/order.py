"""Which sequences a step trains on, and fixed samples: pure functions of (step, seed)."""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np
import torch


class Indexable(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor: ...


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, batch_size: int, n_sequences: int, seed: int) -> list[int]:
    """The sequences of optimizer step ``step``: a pure function of (step, seed), so a resumed
    run, or one split over several ranks, sees exactly the same data."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_sequences)
        indices.append(int(_permutation(n_sequences, seed, epoch)[offset]))
    return indices


def sample_sequences(sequences: Indexable, count: int, seed: int) -> torch.Tensor:
    """A fixed random sample (without replacement) of at most ``count`` sequences."""
    n = len(sequences)
    if count >= n:
        return sequences[torch.arange(n)]
    return sequences[torch.from_numpy(_permutation(n, seed, 1 << 30)[:count].copy())]

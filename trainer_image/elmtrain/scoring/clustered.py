"""The experts' log-probabilities mixed by cluster (c-BTM): each position by its context's weights.

``ensemble-eval --routing clusters`` and ``bench.discovery`` score with it: every scored token
``t`` of a sequence mixes the experts' probabilities by the cluster weights of the text before
it (``prefix_texts``: the sequence's tokens decoded), so a token is predicted only from what a
router would have seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from elmtrain.clusters.routing import ClusterRouter, prefix_texts


@dataclass(frozen=True)
class ClusterMixture:
    logprobs: torch.Tensor  # [sequences, positions]: the mixture's log-probability of each token
    weights: torch.Tensor  # [experts, sequences, positions]: each expert's weight there
    routing_seconds: float  # the contexts' features and weights, measured

    def experts_per_token(self) -> float:
        """The experts with a weight at a position, on average: those a router runs per token."""
        return float((self.weights > 0).sum(0).double().mean()) if self.weights.numel() else 0.0

    def experts_per_sequence(self) -> float:
        """The experts weighted anywhere in a sequence: what runs when a KV cache is kept."""
        used = (self.weights > 0).any(2)
        return float(used.sum(0).double().mean()) if self.weights.numel() else 0.0


def cluster_mixture(
    router: ClusterRouter,
    decode: Callable[[list[int]], str],
    sequences: torch.Tensor,
    logprobs: torch.Tensor,
    temperature: float,
    k: int | None,
) -> ClusterMixture:
    """``logprobs`` [experts, sequences, positions] of ``sequences`` (token ids), mixed by the
    router's weights (``temperature``, the ``k`` nearest; None: all) of each position's context."""
    experts, count, positions = logprobs.shape
    started = time.perf_counter()
    texts = [t for ids in sequences.tolist() for t in prefix_texts(decode, ids)]
    weights = router.weights(texts, temperature, k)
    seconds = time.perf_counter() - started
    # [count * positions, experts] -> [experts, count, positions], as the log-probabilities.
    w = torch.from_numpy(weights).reshape(count, positions, experts).permute(2, 0, 1)
    mixture = torch.logsumexp(torch.log(w) + logprobs.double(), dim=0)
    return ClusterMixture(mixture, w, seconds)

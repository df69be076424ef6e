"""c-BTM's balanced assignment: every cluster takes about the same number of documents.

c-BTM (Gururangan et al. 2023, §2.1; their fork of ``kmeans_pytorch``) balances k-means by
replacing each iteration's nearest-centre step with a balanced linear assignment solved by the
auction algorithm (``auction_lap``, after BASE layers, Lewis et al. 2021). An auction ends with
a price per cluster such that every document's cheapest cluster, distance plus price, is the one
it was given. We keep those prices rather than the sample's labels: a document is then assigned
by ``argmin(distance + price)`` alone, the same function on the fit's sample, in any worker of
the assignment Job and in ``elmtrain assign``, and the corpus (of which the fit saw a uniform
sample) splits about evenly too.

The prices are found by the reverse auction's rule, one cluster at a time: a cluster holding
more than ``ceil(n / k)`` documents raises its price just enough to shed the surplus to their
next-cheapest clusters. Prices only rise and the capacities hold all ``n`` documents, so it
ends (``ROUNDS`` bounds it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics.pairwise import euclidean_distances  # type: ignore[import-untyped]

ROUNDS = 200  # passes over the clusters; the tests' and the benchmark's fits need under 20
EPSILON = 1e-9  # a shed document's margin must be strictly below the new price


def squared_distances(points: Any, centres: np.ndarray) -> np.ndarray:
    """(n, k) squared euclidean distances; ``points`` dense or scipy sparse."""
    return np.asarray(euclidean_distances(points, centres, squared=True))


def labels_at(distances: np.ndarray, prices: np.ndarray) -> np.ndarray:
    labels: np.ndarray = np.argmin(distances + prices[None, :], axis=1).astype(np.int64)
    return labels


def balance_prices(distances: np.ndarray) -> np.ndarray:
    """Prices (k,) under which no cluster is the cheapest for more than ceil(n / k) rows."""
    n, k = distances.shape
    capacity = math.ceil(n / k)
    prices = np.zeros(k)
    for _ in range(ROUNDS):
        moved = False
        for cluster in range(k):
            cost = distances + prices[None, :]
            mine = np.argmin(cost, axis=1) == cluster
            if mine.sum() <= capacity:
                continue
            others = np.delete(cost[mine], cluster, axis=1).min(axis=1)
            margin = others - distances[mine, cluster]  # the price at which each would leave
            # Keep the ``capacity`` documents that value this cluster most; the rest leave.
            prices[cluster] = np.sort(margin)[::-1][capacity] + EPSILON
            moved = True
        if not moved:
            break
    return prices


def balanced_kmeans(
    points: Any, centres: np.ndarray, iterations: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lloyd's iterations with the balanced assignment step, from scikit-learn's k-means
    centres: (centres, prices, labels of ``points``). ``points``: rows l2-normalised, kept
    sparse (dense tf-idf rows would cost ``sample * max_features`` floats)."""
    labels = np.full(points.shape[0], -1, dtype=np.int64)
    prices = np.zeros(len(centres))
    for _ in range(iterations):
        distances = squared_distances(points, centres)
        prices = balance_prices(distances)
        new = labels_at(distances, prices)
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack(
            [
                np.asarray(points[labels == c].mean(axis=0)).ravel()
                if (labels == c).any()
                else centres[c]
                for c in range(len(centres))
            ]
        ).astype(centres.dtype)
    return centres, prices, labels

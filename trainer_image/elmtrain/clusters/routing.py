"""Routing by cluster (c-BTM, Gururangan et al. 2023, §2.3): each expert's weight for a context.

An expert trained on cluster ``j`` (its lineage's ``cluster``) is weighted, for a context ``x``
(the text before the token being predicted), by

    w_j(x) ∝ top-k[ exp(-‖h(x) - c_j‖² / T) ]

over the experts routed: ``h(x)`` is the context's tf-idf row (l2-normalised, as the fit's),
``c_j`` the centre of cluster ``j``, ``T`` the temperature (c-BTM's 0.1), and top-k keeps the
``k`` largest weights (ties: the lower cluster index), renormalised. The balancing prices are
not part of it: they split the training corpus evenly, routing asks which centre the text is
near (c-BTM routes by distance alone). Clusters without an expert are left out, which is the
softmax over the others.

Pure here (distances in, weights out; the experts' clusters from their lineage); the commands
(ensemble-eval, average, serve) read texts and apply it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from elmcore.errors import BadInputError
from elmcore.manifest import ExpertEntry

if TYPE_CHECKING:  # scikit-learn: not for the command line's --help
    from elmtrain.clusters.fit import Clusterer

DEFAULT_TEMPERATURE = 0.1  # c-BTM's (their sequence scorer's ``temperature=0.1``)


def cluster_weights(
    squared_distances: np.ndarray, temperature: float = DEFAULT_TEMPERATURE, k: int | None = None
) -> np.ndarray:
    """(n, m) squared distances to m centres -> (n, m) weights, each row summing to 1:
    ``softmax(-d / T)``, then the ``k`` largest of each row kept (None: all), renormalised."""
    if not temperature > 0 or not np.isfinite(temperature):
        raise BadInputError(f"the cluster temperature must be a positive number, not {temperature}")
    if k is not None and k < 1:
        raise BadInputError(f"cluster top-k must be at least 1, not {k}")
    distances = np.asarray(squared_distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[1] == 0:
        raise ValueError(f"squared distances of shape {distances.shape}: expected (n, m >= 1)")
    logits = -distances / temperature
    logits -= logits.max(axis=1, keepdims=True)
    if k is not None and k < distances.shape[1]:
        # Stable sort on -logits: among equal weights the lower index is kept.
        order = np.argsort(-logits, axis=1, kind="stable")
        dropped = np.ones_like(logits, dtype=bool)
        np.put_along_axis(dropped, order[:, :k], False, axis=1)
        logits[dropped] = -np.inf
    weights: np.ndarray = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights


@dataclass(frozen=True)
class ExpertClusters:
    """The clusters of the experts routed by cluster, all of one clusterer."""

    set: str
    clusterer_sha256: str
    indices: tuple[int, ...]  # the cluster of each expert, in the experts' order


def expert_clusters(experts: Sequence[ExpertEntry]) -> ExpertClusters:
    """Which cluster each expert was trained on, or the BadInputError naming the experts that
    cannot be routed by cluster: without a cluster in their lineage, of another clusterer than
    the rest, or two on one cluster."""
    if not experts:
        raise BadInputError("routing by cluster needs experts; the forest has none yet")
    missing = [e.domain for e in experts if e.lineage is None or e.lineage.cluster is None]
    if missing:
        raise BadInputError(
            f"routing by cluster: experts {', '.join(missing)} were not trained on a cluster "
            "(no lineage.cluster; trained without 'elmtrain branch --cluster')"
        )
    clusters = [e.lineage.cluster for e in experts if e.lineage and e.lineage.cluster]
    by_clusterer: dict[tuple[str, str], list[str]] = {}
    for entry, cluster in zip(experts, clusters, strict=True):
        by_clusterer.setdefault((cluster.set, cluster.clusterer_sha256), []).append(entry.domain)
    if len(by_clusterer) > 1:
        groups = "; ".join(
            f"{', '.join(domains)} of set {name} clusterer {sha[:12]}"
            for (name, sha), domains in sorted(by_clusterer.items())
        )
        raise BadInputError(
            f"routing by cluster: the experts come from {len(by_clusterer)} clusterers "
            f"({groups}); only the experts of one clusterer can be routed by cluster"
        )
    owners: dict[int, str] = {}
    for entry, cluster in zip(experts, clusters, strict=True):
        if cluster.index in owners:
            raise BadInputError(
                f"routing by cluster: experts {owners[cluster.index]} and {entry.domain} "
                f"were both trained on cluster {cluster.index} of set {cluster.set}"
            )
        owners[cluster.index] = entry.domain
    return ExpertClusters(
        clusters[0].set, clusters[0].clusterer_sha256, tuple(c.index for c in clusters)
    )


@dataclass(frozen=True)
class ClusterRouter:
    """A clusterer and the clusters of the experts it routes: texts -> expert weights."""

    clusterer: Clusterer
    experts: ExpertClusters

    def __post_init__(self) -> None:
        size = self.clusterer.settings.clusters
        beyond = [i for i in self.experts.indices if i >= size]
        if beyond:
            raise BadInputError(
                f"routing by cluster: clusters {beyond} of set {self.experts.set} do not exist "
                f"(its clusterer has {size})"
            )

    def squared_distances(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, experts): each text's squared distance to each expert's centre."""
        if not texts:
            return np.zeros((0, len(self.experts.indices)))
        return self.clusterer.distances(texts)[:, list(self.experts.indices)]

    def weights(
        self,
        texts: Sequence[str],
        temperature: float = DEFAULT_TEMPERATURE,
        k: int | None = None,
        among: Sequence[int] | None = None,
    ) -> np.ndarray:
        """(texts, experts) weights; with ``among`` (expert positions), only those experts
        (the others' columns are 0), the softmax renormalised over them."""
        distances = self.squared_distances(texts)
        columns = list(range(distances.shape[1])) if among is None else list(among)
        out = np.zeros_like(distances)
        if len(texts) and columns:
            out[:, columns] = cluster_weights(distances[:, columns], temperature, k)
        return out


def prefix_texts(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """The text before each scored position of ``ids`` (tokens 1..len-1, as
    ``token_logprobs`` scores them): the context each token is predicted from, decoded
    (``decode``: the tokenizer's). c-BTM routes each position by its prefix this way."""
    return [decode(list(ids[: t + 1])) for t in range(len(ids) - 1)]

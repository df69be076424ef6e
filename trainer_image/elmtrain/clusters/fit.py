"""Fit and apply c-BTM's clusterer: tf-idf features, k-means centres, nearest-centre labels.

Pure: documents in, arrays out; storing them is ``elmtrain.clusters.store``. Rows of the tf-idf
matrix are l2-normalised (scikit-learn's default), so the euclidean distance c-BTM's k-means uses
orders centres as the cosine distance does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.cluster import KMeans  # type: ignore[import-untyped]
from sklearn.feature_extraction.text import TfidfVectorizer  # type: ignore[import-untyped]

from elmcore.errors import BadInputError
from elmtrain.clusters.balance import balanced_kmeans, labels_at, squared_distances


class ClusterSettings(BaseModel):
    """What a fit is asked for (``spec.clusters``, ``spec.features``, ``spec.balance``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clusters: int = Field(ge=1, le=1024)
    max_features: int = Field(default=50_000, ge=1)
    ngram_min: int = Field(default=1, ge=1)
    ngram_max: int = Field(default=1, ge=1)
    balance: bool = True
    seed: int = 0


@dataclass
class Clusterer:
    """A fitted clusterer: vocabulary (term of each feature), idf weights and centres."""

    settings: ClusterSettings
    vocabulary: list[str]
    idf: np.ndarray  # (features,) float64
    centres: np.ndarray  # (clusters, features) float64
    prices: np.ndarray  # (clusters,) added to the distances: balance (all 0 without)
    fitted_documents: int

    def vectorizer(self) -> TfidfVectorizer:
        vectorizer = _vectorizer(self.settings, vocabulary=self.vocabulary)
        vectorizer.idf_ = self.idf  # scikit-learn's setter: a fitted vectorizer, no refit
        return vectorizer

    def distances(self, documents: Sequence[str]) -> np.ndarray:
        """(documents, clusters) squared euclidean distances of l2-normalised tf-idf rows."""
        return squared_distances(self.vectorizer().transform(documents), self.centres)

    def assign(self, documents: Sequence[str]) -> np.ndarray:
        """Each document's cheapest cluster (distance plus the cluster's balancing price): one
        function of the document alone, so the Indexed Job's workers and ``elmtrain assign``
        agree whatever slices they read."""
        if not documents:
            return np.zeros(0, dtype=np.int64)
        return labels_at(self.distances(documents), self.prices)


def _vectorizer(settings: ClusterSettings, vocabulary: list[str] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(
        max_features=None if vocabulary is not None else settings.max_features,
        ngram_range=(settings.ngram_min, settings.ngram_max),
        vocabulary=vocabulary,
        sublinear_tf=True,
        dtype=np.float64,
    )


def fit_clusterer(
    documents: Sequence[str], settings: ClusterSettings
) -> tuple[Clusterer, np.ndarray]:
    """The clusterer fitted on ``documents`` (a bounded sample), and their labels."""
    if settings.ngram_max < settings.ngram_min:
        raise BadInputError(f"ngram range {settings.ngram_min},{settings.ngram_max} is empty")
    if len(documents) < settings.clusters:
        raise BadInputError(
            f"{len(documents)} documents to fit, fewer than the {settings.clusters} clusters asked"
        )
    vectorizer = _vectorizer(settings)
    try:
        points = vectorizer.fit_transform(documents)
    except (
        ValueError
    ) as error:  # e.g. "empty vocabulary; perhaps the documents only contain stop words"
        raise BadInputError(f"no features in the documents: {error}") from None
    kmeans = KMeans(n_clusters=settings.clusters, n_init=4, random_state=settings.seed)
    labels = kmeans.fit_predict(points).astype(np.int64)
    centres = np.asarray(kmeans.cluster_centers_, dtype=np.float64)
    prices = np.zeros(settings.clusters)
    if settings.balance and settings.clusters > 1:
        centres, prices, labels = balanced_kmeans(points, centres)
    vocabulary = [""] * len(vectorizer.vocabulary_)
    for term, column in vectorizer.vocabulary_.items():
        vocabulary[column] = term
    clusterer = Clusterer(
        settings=settings,
        vocabulary=vocabulary,
        idf=np.asarray(vectorizer.idf_, dtype=np.float64),
        centres=centres,
        prices=prices,
        fitted_documents=len(documents),
    )
    return clusterer, labels

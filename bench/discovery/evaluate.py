"""Test perplexity of the discovery run's forests, their routing's cost, and the clusters'
agreement with the hidden labels.

Rows of a forest of experts (``labelled`` or ``k=<k>``): ``posterior`` mixes every expert by
the posterior (the cached prior from the domain's validation text, Bayes-updated per position:
BTM's ensemble), ``posterior top-1`` runs only the expert of the largest prior; a cluster
forest adds ``cluster-routed`` (every position mixed by its context's cluster weights, c-BTM's
temperature) and ``cluster-routed top-1`` (only the nearest cluster's expert).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.btm.evaluate import Evaluator, Rows
from bench.discovery.forests import LABELS, cluster_set
from bench.discovery.scale import POOLED

LABELLED = "labelled"


def forest_name(k: int) -> str:
    return f"k={k}"


def posterior_row(forest: str, top1: bool = False) -> str:
    return f"{forest} posterior{' top-1' if top1 else ''}"


def cluster_row(forest: str, top1: bool = False) -> str:
    return f"{forest} cluster-routed{' top-1' if top1 else ''}"


@dataclass
class Costs:
    """Per row: experts run per scored token (summed with the tokens, to average) and the
    seconds spent routing (tf-idf features and weights)."""

    expert_tokens: dict[str, float] = field(default_factory=dict)
    routing_seconds: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, row: str, experts_per_token: float, tokens: int, seconds: float = 0.0) -> None:
        self.expert_tokens[row] = self.expert_tokens.get(row, 0.0) + experts_per_token * tokens
        self.routing_seconds[row] = self.routing_seconds.get(row, 0.0) + seconds
        self.tokens[row] = self.tokens.get(row, 0) + tokens

    def summary(self, expert_ms_per_token: float) -> dict[str, dict[str, float]]:
        """row -> experts per token, routing ms per token, and the two as ms per token."""
        out = {}
        for row, tokens in self.tokens.items():
            experts = self.expert_tokens[row] / tokens
            routing = 1000 * self.routing_seconds[row] / tokens
            out[row] = {
                "experts_per_token": experts,
                "routing_ms_per_token": routing,
                "ms_per_token": experts * expert_ms_per_token + routing,
            }
        return out


def forest_rows(
    evaluator: Evaluator,
    forest: Path,
    name: str,
    domains: tuple[str, ...],
    costs: Costs,
    temperature: float | None = None,
) -> Rows:
    """The rows (module docstring) of one forest; ``temperature`` given: routed by cluster too."""
    import torch

    from elmtrain.clusters.store import load_router
    from elmtrain.forest import Forest
    from elmtrain.scoring.clustered import cluster_mixture
    from elmtrain.scoring.evaluation import domain_prior
    from elmtrain.scoring.logprobs import ensemble_logprobs, perplexity, route

    opened = Forest.open(str(forest))
    entries = opened.manifest().sorted_experts()
    dirs = [opened.fetch(e) for e in entries]
    router = load_router(opened.storage, entries) if temperature is not None else None
    rows: Rows = {}
    for domain in domains:
        prior = torch.tensor(
            domain_prior(dirs, evaluator.text(domain, "valid"), evaluator.runtime),
            dtype=torch.float64,
        )
        per_expert = torch.stack([evaluator.logprobs(d, domain) for d in dirs])
        tokens = per_expert[0].numel()
        chosen = route(prior, 1)
        mixtures = {
            posterior_row(name): (ensemble_logprobs(per_expert, prior), float(len(dirs)), 0.0),
            posterior_row(name, True): (
                ensemble_logprobs(per_expert[chosen], prior[chosen]),
                1.0,
                0.0,
            ),
        }
        if router is not None and temperature is not None:
            for top1 in (False, True):
                mixed = cluster_mixture(
                    router,
                    evaluator.tokenizer.decode,
                    evaluator.text(domain, "test"),
                    per_expert,
                    temperature,
                    1 if top1 else None,
                )
                mixtures[cluster_row(name, top1)] = (
                    mixed.logprobs,
                    mixed.experts_per_token(),
                    mixed.routing_seconds,
                )
        for row, (logprobs, experts, seconds) in mixtures.items():
            rows.setdefault(row, {})[domain] = perplexity(logprobs)[1]
            costs.add(row, float(experts), tokens, seconds)
    return rows


def single_rows(
    evaluator: Evaluator, models: dict[str, Path], domains: tuple[str, ...], costs: Costs
) -> Rows:
    """One model each (the seed, the dense model): one expert per token."""
    rows: Rows = {}
    for row, model in models.items():
        for domain in domains:
            logprobs = evaluator.logprobs(model, domain)
            rows.setdefault(row, {})[domain] = evaluator.perplexity(model, domain)
            costs.add(row, 1.0, logprobs.numel())
    return rows


def expert_ms_per_token(evaluator: Evaluator, model: Path, domain: str, repeats: int) -> float:
    """One expert's scoring time per token on this machine (the fastest of ``repeats``): every
    model here has the same architecture, so a row's cost is its experts times this."""
    from elmtrain.scoring.evaluation import model_logprobs

    text = evaluator.text(domain, "test")
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        logprobs = model_logprobs(model, text, evaluator.runtime)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / logprobs.numel()


def clusters_found(corpus: Path, forest: Path, k: int) -> dict[str, Any]:
    """The normalised mutual information of the pooled documents' clusters (the clusterer's
    own assignment, as ``elmtrain assign`` prints it) with their hidden domains, and each
    cluster's documents by domain."""
    from sklearn.metrics import normalized_mutual_info_score  # type: ignore[import-untyped]

    from elmtrain.clusters.store import load_clusterer
    from elmtrain.data.documents import iter_documents
    from elmtrain.forest import Forest

    labels = json.loads((corpus / POOLED / LABELS).read_text())
    documents = list(iter_documents([str(corpus / POOLED / "train.txt")]))
    if len(documents) != len(labels):
        raise RuntimeError(f"{len(documents)} pooled documents read, {len(labels)} labels")
    clusterer, _ = load_clusterer(Forest.open(str(forest)).storage, cluster_set(k))
    assigned = [int(c) for c in clusterer.assign(documents)]
    composition = {
        f"c{c}": dict(Counter(d for d, a in zip(labels, assigned, strict=True) if a == c))
        for c in range(k)
    }
    return {
        "nmi": float(normalized_mutual_info_score(labels, assigned)),
        "sizes": [assigned.count(c) for c in range(k)],
        "composition": composition,
    }

"""Inference cost of each way to use the forest, against the dense model, measured in one
process on the same sequences: parameters active per token, tokens/s scoring (one forward pass
over test sequences) and tokens/s generating (key/value-cached streams, as ``bench.ensemble``).

Each timing is the median of ``repeats`` after a warm-up, the variants interleaved so that load
from other processes falls on all of them alike. Ensemble timings exclude the cached prior (one
per domain, computed once); the routed top-2 reads the prompt with every expert to route, a
per-prompt cost kept out of tokens/s as in ``bench.ensemble``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from elmtrain.runtime import Runtime

DENSE, AVERAGE, MIX = "dense", "parameter average", "mix (top-2 MoE)"
ALL, TOP2 = "ensemble (all experts)", "ensemble top-2 (per position)"
ROUTED = "ensemble routed top-2"


def active_parameters(model: PreTrainedModel) -> int:
    """Weights a token touches: all of them, but of an MoE layer's experts only top-k of E."""
    config = model.config
    experts = int(getattr(config, "num_local_experts", 0) or 0)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    total = 0.0
    for name, param in model.named_parameters():
        share = top_k / experts if experts and ".experts." in f"{name}." else 1.0
        total += param.numel() * share
    return round(total)


def _median_seconds(repeats: int, jobs: dict[str, Callable[[], float | None]]) -> dict[str, float]:
    """A job's seconds: its wall time, or what it returns (the part it timed itself)."""
    for job in jobs.values():
        job()  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            started = time.perf_counter()
            own = job()
            timings[name].append(time.perf_counter() - started if own is None else own)
    return {name: statistics.median(t) for name, t in timings.items()}


def measure(
    dense: Path,
    average: Path,
    experts: list[Path],
    mixed: Path,
    prior: torch.Tensor,
    sequences: torch.Tensor,
    new_tokens: int,
    repeats: int,
    runtime: Runtime,
) -> dict[str, Any]:
    import torch

    from elmtrain.model.families import load_model
    from elmtrain.scoring.logprobs import ensemble_logprobs, route, token_logprobs
    from elmtrain.scoring.streams import ContextStream

    one = {
        DENSE: load_model(dense, runtime.device),
        AVERAGE: load_model(average, runtime.device),
        MIX: load_model(mixed, runtime.device),
    }
    forest = [load_model(d, runtime.device) for d in experts]
    chosen = route(prior, 2)
    tokens = sequences[:, 1:].numel()

    def score(models: list[PreTrainedModel], weights: torch.Tensor, k: int | None) -> None:
        """Every model's token log-probabilities, then (ensembles) their posterior mixture."""
        logprobs = torch.stack([token_logprobs(m, sequences, runtime) for m in models])
        if len(models) > 1:
            ensemble_logprobs(logprobs, weights, k)

    routed = [forest[j] for j in chosen]
    scoring: dict[str, Callable[[], float | None]] = {
        name: partial(score, [m], prior[:1], None) for name, m in one.items()
    }
    scoring[ALL] = partial(score, forest, prior, None)
    scoring[TOP2] = partial(score, forest, prior, 2)
    scoring[ROUTED] = partial(score, routed, prior[chosen], None)
    score_s = _median_seconds(repeats, scoring)

    prompt = sequences[0, : sequences.shape[1] // 2].tolist()
    continuation = sequences[1, :new_tokens].tolist()  # the same tokens for all: cost only

    @torch.no_grad()
    def generate(models: list[PreTrainedModel]) -> float:
        """Seconds generating, the prompt read: each stream advances by every token."""
        streams = [ContextStream(m, prompt, runtime.device) for m in models]
        started = time.perf_counter()
        for token in continuation:
            for stream in streams:
                stream.advance(token)
        return time.perf_counter() - started

    generating: dict[str, Callable[[], float | None]] = {
        name: partial(generate, [m]) for name, m in one.items()
    }
    generating[ALL] = partial(generate, forest)
    generating[TOP2] = generating[ALL]  # every expert runs at every position
    generating[ROUTED] = partial(generate, routed)
    gen_s = _median_seconds(repeats, generating)

    params = {name: active_parameters(m) for name, m in one.items()}
    params[ALL] = params[TOP2] = sum(active_parameters(m) for m in forest)
    params[ROUTED] = sum(active_parameters(forest[j]) for j in chosen)
    rows = {}
    for name in score_s:
        rows[name] = {
            "active_parameters": params[name],
            "scoring_tokens_per_second": tokens / score_s[name],
            "generation_tokens_per_second": new_tokens / gen_s[name],
        }
    for row in rows.values():
        for key in (
            "active_parameters",
            "scoring_tokens_per_second",
            "generation_tokens_per_second",
        ):
            row[f"{key}_vs_dense"] = row[key] / rows[DENSE][key]
    return {
        "rows": rows,
        "scored_tokens": tokens,
        "generated_tokens": new_tokens,
        "routed_experts": [int(j) for j in chosen],
    }

"""Scoring text: each token's log-probability given the tokens before it, under the model a
request names, and OpenAI's legacy ``logprobs`` object built from it.

The forest (the routed ensemble) scores as ``elmtrain ensemble-eval`` does: every expert reads
the text, and each position mixes their laws by the posterior over experts given the text before
it (Bayes' rule from the served prior), keeping the engine's top-k most probable experts at each
position (``ensemble-eval --top-k``'s ``top<k>`` row; the math is elmtrain.scoring.logprobs').
``/average`` scores with the parameter average for the text's posterior, ``/expert/<d>`` and
``/seed`` with that one model. Experts a request opts out of (serving/optout.py) are not run: the
mixture and the average are of the allowed experts, the prior renormalised over them.

Routed by cluster (``cluster_temperature`` given), each position mixes the allowed experts by
the cluster weights of the text before it instead, the engine's top-k nearest kept (c-BTM, as
``ensemble-eval --routing clusters``; elmtrain.clusters.routing), and the average is weighted by
the whole text's cluster weights; experts without weight anywhere are not run.

Runs on a worker thread of its own (one): a request costs one forward pass per model over at
most the context, and memory of experts x tokens x vocabulary floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from elmtrain.clusters.routing import prefix_texts
from elmtrain.scoring.logprobs import ensemble_logprobs, log_posterior
from elmtrain.serving.modelset import AVERAGE, ENSEMBLE, Member, ModelSet, Target

CHUNK = 64  # positions whose mixed laws over the vocabulary are built at once


@dataclass(frozen=True)
class Scores:
    """Of a text of T tokens: for t = 1..T-1, the log-probability of token t given the tokens
    before it, and the ``k`` most probable tokens there (id, log-probability)."""

    token_logprobs: list[float]
    top: list[list[tuple[int, float]]]


def _laws(model: PreTrainedModel, ids: list[int], device: torch.device) -> torch.Tensor:
    """[T-1, V]: the model's next-token log-probabilities after each prefix."""
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _chosen(laws: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return laws.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).double()


def _top(laws: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    if k == 0:
        return [[] for _ in range(len(laws))]
    values, indices = torch.topk(laws, k, dim=-1)
    return [
        list(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(indices.tolist(), values.double().tolist(), strict=True)
    ]


@torch.inference_mode()
def score(
    model_set: ModelSet,
    target: Target,
    top_k: int,
    ids: list[int],
    k: int,
    allowed: Sequence[int] | None = None,
    ran: Callable[[str], None] = lambda label: None,
    cluster_temperature: float | None = None,
) -> Scores:
    """``ids``' scores under the model ``target`` names (``top_k``: the engine's), the routed
    models mixing only the ``allowed`` experts (indices; None: all). ``ran`` is told each
    model's metrics label as it runs (the opt-out's evidence). ``cluster_temperature``: routed
    by cluster (the model set must have its router), with that temperature."""
    if len(ids) < 2:
        return Scores([], [])
    device = model_set.runtime.device

    def laws_of(member: Member) -> torch.Tensor:
        ran(member.label)
        return _laws(member.model, ids, device)

    if target.kind not in (ENSEMBLE, AVERAGE):
        laws = laws_of(model_set.single(target))
        return Scores(_chosen(laws, ids).tolist(), _top(laws, k))
    experts = list(range(len(model_set.experts)) if allowed is None else allowed)
    if cluster_temperature is not None:
        return _score_by_cluster(
            model_set, target, top_k, ids, k, experts, laws_of, cluster_temperature
        )
    every = [laws_of(model_set.experts[i]) for i in experts]  # K x [T-1, V]
    chosen = torch.stack([_chosen(laws, ids) for laws in every])  # [K, T-1]
    prior = model_set.log_prior[experts].exp()  # renormalised by Bayes' rule below
    if target.kind == AVERAGE:
        posterior = log_posterior(chosen.sum(-1), prior)
        mix = model_set.average_weights(posterior, top_k)  # by position in ``experts``
        laws = laws_of(model_set.average({experts[i]: w for i, w in mix.items()}))
        return Scores(_chosen(laws, ids).tolist(), _top(laws, k))
    mixed = ensemble_logprobs(chosen[:, None, :], prior, top_k)[0]
    top: list[list[tuple[int, float]]] = []
    if k:
        context = torch.cumsum(chosen, dim=-1) - chosen  # log p_j(tokens before t)
        weights = log_posterior(context, prior[:, None], top_k)  # [K, T-1]
        stacked = torch.stack(every)  # [K, T-1, V]
        for start in range(0, stacked.shape[1], CHUNK):
            part = slice(start, start + CHUNK)
            laws = torch.logsumexp(weights[:, part, None] + stacked[:, part].double(), dim=0)
            top += _top(laws, k)
    else:
        top = [[] for _ in range(len(ids) - 1)]
    return Scores(mixed.tolist(), top)


def _score_by_cluster(
    model_set: ModelSet,
    target: Target,
    top_k: int,
    ids: list[int],
    k: int,
    experts: list[int],
    laws_of: Callable[[Member], torch.Tensor],
    temperature: float,
) -> Scores:
    router = model_set.router
    assert router is not None, "the server routes by cluster only with the model set's router"
    decode = model_set.tokenizer.decode
    if target.kind == AVERAGE:
        whole = router.weights([decode(ids)], temperature, among=experts)[0]
        log_weights = torch.log(torch.tensor([whole[i] for i in experts], dtype=torch.float64))
        mix = model_set.average_weights(log_weights, top_k)  # by position in ``experts``
        laws = laws_of(model_set.average({experts[i]: w for i, w in mix.items()}))
        return Scores(_chosen(laws, ids).tolist(), _top(laws, k))
    per_position = router.weights(prefix_texts(decode, ids), temperature, top_k, among=experts)
    used = [i for i in experts if per_position[:, i].any()]  # the others are never weighted
    weights = torch.log(torch.from_numpy(per_position[:, used]).T)  # [K, T-1]
    every = [laws_of(model_set.experts[i]) for i in used]
    chosen = torch.stack([_chosen(laws, ids) for laws in every])
    mixed = torch.logsumexp(weights + chosen, dim=0)
    top: list[list[tuple[int, float]]] = [[] for _ in range(len(ids) - 1)]
    if k:
        top = []
        stacked = torch.stack(every)
        for start in range(0, stacked.shape[1], CHUNK):
            part = slice(start, start + CHUNK)
            laws = torch.logsumexp(weights[:, part, None] + stacked[:, part].double(), dim=0)
            top += _top(laws, k)
    return Scores(mixed.tolist(), top)


def logprobs_body(
    tokenizer: PreTrainedTokenizerFast,
    ids: list[int],
    scores: Scores,
    first: int,
    offset: int,
) -> dict[str, Any]:
    """OpenAI's ``logprobs`` for ``ids[first:]``: ``tokens``, ``token_logprobs`` and
    ``top_logprobs`` (null for the text's first token, which has no context), ``text_offset``
    (each token's first character in the prompt and completion, counted from ``offset``)."""
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    at = offset
    for position in range(first, len(ids)):
        piece = tokenizer.decode([ids[position]])
        tokens.append(piece)
        offsets.append(at)
        at += len(piece)
        if position == 0:
            logprobs.append(None)
            tops.append(None)
        else:
            logprobs.append(scores.token_logprobs[position - 1])
            tops.append({tokenizer.decode([t]): lp for t, lp in scores.top[position - 1]})
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }

"""Log-likelihoods of text under one model, and the posterior-weighted ensemble of several.

Two ways to keep only k experts: ``ensemble_logprobs(..., k)`` keeps the k most probable at each
position, which needs every expert's likelihood (all K models run); ``route`` fixes the k experts
up front from the cached prior (or a short prefix), so only k models ever run.

Positions: for sequences [N, T], ``token_logprobs`` returns [N, T-1], the log-probability of
token t given tokens < t for t = 1..T-1 (the first token has no context and is not scored).
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from elmcore.errors import BadInputError
from elmtrain.model.families import context_length
from elmtrain.runtime import Runtime


@torch.no_grad()
def token_logprobs(
    model: PreTrainedModel, sequences: torch.Tensor, runtime: Runtime, batch_size: int = 16
) -> torch.Tensor:
    limit = context_length(model)
    if sequences.shape[1] > limit:
        raise BadInputError(
            f"sequences of {sequences.shape[1]} tokens exceed the model's context ({limit}): "
            f"use a --seq-len of at most {limit}"
        )
    model.eval()
    rows = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size].to(runtime.device)
        with runtime.autocast():
            logits = model(input_ids=batch).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        rows.append(logp.gather(-1, batch[:, 1:, None]).squeeze(-1).cpu())
    return torch.cat(rows) if rows else torch.empty(0, sequences.shape[1] - 1)


def perplexity(logprobs: torch.Tensor) -> tuple[float, float, int]:
    """(mean loss in nats per token, perplexity, tokens scored)."""
    tokens = logprobs.numel()
    loss = float(-logprobs.double().mean()) if tokens else math.nan
    return loss, math.exp(loss) if tokens else math.nan, tokens


def ensemble_logprobs(
    expert_logprobs: torch.Tensor, prior: torch.Tensor, k: int | None = None
) -> torch.Tensor:
    """Mixture log-probabilities, [K, N, T] -> [N, T].

    p(x_t | x_<t) = sum_j p_j(x_t | x_<t) P(D=j | x_<t), with the posterior
    P(D=j | x_<t) ∝ P(D=j) prod_{s<t} p_j(x_s | x_<s) updated as the context grows, and only
    its ``k`` largest entries kept (renormalised) when ``k`` is given.
    """
    lp = expert_logprobs.double()
    context = torch.cumsum(lp, dim=-1) - lp  # log p_j(x_<t): the sum over earlier positions
    prior_shape = prior.double().reshape(-1, *([1] * (lp.dim() - 1)))
    return torch.logsumexp(log_posterior(context, prior_shape, k) + lp, dim=0)


def log_posterior(
    context_loglik: torch.Tensor, prior: torch.Tensor, k: int | None = None
) -> torch.Tensor:
    """log P(D=j | context) over dim 0 by Bayes' rule, keeping the top ``k`` (renormalised)."""
    joint = torch.log(prior.double()) + context_loglik.double()
    if k is not None and k < joint.shape[0]:
        keep = torch.topk(joint, k, dim=0).indices
        joint = joint + torch.full_like(joint, -math.inf).scatter(0, keep, 0.0)
    return joint - torch.logsumexp(joint, dim=0, keepdim=True)


def route(prior: torch.Tensor, k: int | None) -> list[int]:
    """The indices (ascending) of the ``k`` experts with the largest prior: the only ones a
    routed ensemble runs. ``None`` or ``k >= K`` keeps all."""
    if k is None or k >= len(prior):
        return list(range(len(prior)))
    if k < 1:
        raise ValueError(f"top-k must be >= 1, not {k}")
    return sorted(int(i) for i in torch.topk(prior.double(), k).indices)

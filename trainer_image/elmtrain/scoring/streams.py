"""One model reading a growing context through its key/value cache: the log-likelihood of the
context so far (what the posterior over experts needs) and the next token's log-probabilities,
each new token costing one forward step (``elmtrain generate``)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel


class ContextStream:
    """Call under ``torch.no_grad()``: nothing here is trained."""

    def __init__(self, model: PreTrainedModel, ids: list[int], device: torch.device) -> None:
        self.model = model
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        logp = torch.log_softmax(out.logits[0].double(), dim=-1).cpu()
        targets = torch.tensor(ids[1:])[:, None]
        # log p(context): every token of the prompt after the first, given the ones before it.
        self.context_loglik = float(logp[:-1].gather(-1, targets).sum())
        self.next_logp = logp[-1]
        self.cache: Any = out.past_key_values
        self.device = device

    def advance(self, token: int) -> None:
        self.context_loglik += float(self.next_logp[token])
        out = self.model(
            input_ids=torch.tensor([[token]], device=self.device),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.next_logp = torch.log_softmax(out.logits[0, -1].double(), dim=-1).cpu()
        self.cache = out.past_key_values

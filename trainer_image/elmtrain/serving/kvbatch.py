"""Sequences decoding together on one model: one forward pass per step for all of them.

Each member has its own length, so the batch's key/value cache is left-padded: row i holds
``mask[i].sum()`` real positions at the right end, zeros (masked) before them. Members join at
any step (continuous batching): a prefilled prompt's cache rows are padded to the batch's length,
or the batch to theirs, and concatenated. A finished member's row is dropped, and columns that no
member needs any more are trimmed, so the cache stays as long as its longest member.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel

M = TypeVar("M")  # what a batch's members are (the engine's sequences)


@dataclass
class Rows:
    """Key/value cache rows, left-padded to one length, with the mask of their real positions."""

    keys: list[torch.Tensor]  # per layer [N, H, L, D]
    values: list[torch.Tensor]
    mask: torch.Tensor  # [N, L] bool

    def select(self, index: Sequence[int]) -> Rows:
        at = torch.tensor(list(index), dtype=torch.long)
        on = at.to(self.keys[0].device)
        return Rows([k[on] for k in self.keys], [v[on] for v in self.values], self.mask[at])


def concat(parts: Sequence[Rows]) -> Rows:
    """Rows of several batches as one, the shorter ones padded on the left."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.mask.shape[1] for p in parts)
    layers = range(len(parts[0].keys))
    return Rows(
        [torch.cat([_left_pad(p.keys[i], length, 2) for p in parts]) for i in layers],
        [torch.cat([_left_pad(p.values[i], length, 2) for p in parts]) for i in layers],
        torch.cat([_left_pad(p.mask, length, 1) for p in parts]),
    )


@dataclass
class Prefill:
    """Prompts read by one model: what routing needs and what decoding continues from."""

    prompt_loglik: torch.Tensor  # [N] float64: log p(prompt[1:] | prompt[0]) per row
    next_logp: torch.Tensor  # [N, V] float64: the next token's log-probabilities
    rows: Rows

    def select(self, index: Sequence[int]) -> Prefill:
        at = torch.tensor(list(index), dtype=torch.long)
        return Prefill(self.prompt_loglik[at], self.next_logp[at], self.rows.select(index))


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0, 1, ... over the real tokens (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def prefill(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], device: torch.device
) -> Prefill:
    """Read every prompt (each at least one token) in one left-padded forward pass."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(list(prompt))
        mask[row, length - len(prompt) :] = True
    cache = DynamicCache()
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.long().to(device),
        position_ids=_positions(mask).to(device),
        past_key_values=cache,
        use_cache=True,
    )
    logp = torch.log_softmax(out.logits.double(), dim=-1).cpu()
    token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    # A token is scored if it and the token before it are real (the first one has no context).
    scored = mask[:, 1:] & mask[:, :-1]
    loglik = torch.where(scored, token_logp, torch.zeros_like(token_logp)).sum(-1)
    keep = mask.to(device)[:, None, :, None]
    # Padded positions hold zeros: whatever the model computed there never reaches a real row.
    keys = [torch.where(keep, layer.keys, 0.0) for layer in cache.layers]
    values = [torch.where(keep, layer.values, 0.0) for layer in cache.layers]
    return Prefill(loglik, logp[:, -1], Rows(keys, values, mask))


class DecodeBatch(Generic[M]):
    """The members decoding on one model, with their shared left-padded cache."""

    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        self.model, self.device = model, device
        self.members: list[M] = []
        self.rows: Rows | None = None

    def __len__(self) -> int:
        return len(self.members)

    def join(self, members: Sequence[M], rows: Rows) -> None:
        self.rows = rows if self.rows is None else concat([self.rows, rows])
        self.members += list(members)

    def leave(self, gone: Collection[M]) -> None:
        keep = [i for i, m in enumerate(self.members) if m not in gone]
        if len(keep) == len(self.members) or self.rows is None:
            return
        self.members = [self.members[i] for i in keep]
        if not keep:
            self.rows = None
            return
        rows = self.rows.select(keep)
        first = int(rows.mask.any(0).nonzero()[0])  # columns before it are padding for everyone
        self.rows = Rows(
            [k[:, :, first:] for k in rows.keys],
            [v[:, :, first:] for v in rows.values],
            rows.mask[:, first:],
        )

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each member its next token (in ``members`` order); [B, V] float64 log-probs."""
        assert self.rows is not None and len(tokens) == len(self.members)
        mask = torch.cat([self.rows.mask, torch.ones(len(self), 1, dtype=torch.bool)], dim=1)
        positions = mask.long().sum(-1, keepdim=True) - 1
        cache = DynamicCache(
            ddp_cache_data=list(zip(self.rows.keys, self.rows.values, strict=True))
        )
        out = self.model(
            input_ids=torch.tensor(list(tokens), device=self.device)[:, None],
            attention_mask=mask.long().to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
        )
        self.rows = Rows(
            [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], mask
        )
        return torch.log_softmax(out.logits[:, -1].double(), dim=-1).cpu()

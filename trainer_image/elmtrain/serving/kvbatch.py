"""Sequences decoding together on one model: one forward pass per step for all of them.

Each member has its own length, so the batch's key/value cache is left-padded: row i holds
``mask[i].sum()`` real positions at the right end, zeros (masked) before them. Members join at
any step (continuous batching): a prefilled prompt's cache rows are padded to the batch's length,
or the batch to theirs, and concatenated. A finished member's row is dropped, and columns that no
member needs any more are trimmed, so the cache stays as long as its longest member.

The cache lives in buffers with room to grow (doubling), written in place each step: a step
costs the new position, not a copy of the whole cache as concatenation would.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from transformers import Cache, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from elmtrain.serving.fastpath import decoder_for

M = TypeVar("M")  # what a batch's members are (the engine's sequences)


@dataclass
class Rows:
    """Key/value cache rows, left-padded to one length, with the mask of their real positions.
    The tensors may be longer than ``length`` (room to grow); only ``[..., :length]`` counts."""

    keys: list[torch.Tensor]  # per layer [N, H, capacity, D]
    values: list[torch.Tensor]
    mask: torch.Tensor  # [N, capacity] bool
    length: int

    def select(self, index: Sequence[int]) -> Rows:
        at = torch.tensor(list(index), dtype=torch.long)
        on = at.to(self.keys[0].device)
        return Rows(
            [k[on] for k in self.keys], [v[on] for v in self.values], self.mask[at], self.length
        )

    def trimmed(self, first: int, capacity: int) -> Rows:
        """Columns ``first..length`` only, in new buffers of ``capacity`` columns."""
        size = self.length - first

        def move(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[dim] = capacity
            out = tensor.new_zeros(shape)
            out.narrow(dim, 0, size).copy_(tensor.narrow(dim, first, size))
            return out

        keys = [move(k, 2) for k in self.keys]
        values = [move(v, 2) for v in self.values]
        return Rows(keys, values, move(self.mask, 1), size)


def concat(parts: Sequence[Rows], spare: int = 0) -> Rows:
    """Rows of several batches as one, the shorter ones padded on the left, with ``spare``
    columns of room to grow."""
    length = max(p.length for p in parts)
    capacity = length + spare
    layers = range(len(parts[0].keys))

    def joined(pick: Any, dim: int) -> torch.Tensor:
        pieces = []
        for part in parts:
            tensor = pick(part)
            shape = list(tensor.shape)
            shape[dim] = capacity
            out = tensor.new_zeros(shape)
            offset = length - part.length  # left padding
            out.narrow(dim, offset, part.length).copy_(tensor.narrow(dim, 0, part.length))
            pieces.append(out)
        return torch.cat(pieces)

    return Rows(
        [joined(lambda p, i=i: p.keys[i], 2) for i in layers],
        [joined(lambda p, i=i: p.values[i], 2) for i in layers],
        joined(lambda p: p.mask, 1),
        length,
    )


@dataclass
class Prefill:
    """Prompts read by one model: what routing needs and what decoding continues from."""

    prompt_loglik: torch.Tensor  # [N] float64: log p(prompt[1:] | prompt[0]) per row
    next_logp: torch.Tensor  # [N, V] float32: the next token's log-probabilities
    rows: Rows

    def select(self, index: Sequence[int]) -> Prefill:
        at = torch.tensor(list(index), dtype=torch.long)
        return Prefill(self.prompt_loglik[at], self.next_logp[at], self.rows.select(index))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0, 1, ... over the real tokens (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _BufferLayer(DynamicLayer):  # type: ignore[misc]  # transformers is untyped for mypy
    """A cache layer that writes each step into a preallocated buffer (``Rows``' tensors)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.buffer_keys, self.buffer_values, self.length = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        self.buffer_keys[:, :, self.length : end] = key_states
        self.buffer_values[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.buffer_keys[:, :, :end]
        self.values = self.buffer_values[:, :, :end]
        return self.keys, self.values


@torch.inference_mode()
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
    logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
    token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).double()
    # A token is scored if it and the token before it are real (the first one has no context).
    scored = mask[:, 1:] & mask[:, :-1]
    loglik = torch.where(scored, token_logp, torch.zeros_like(token_logp)).sum(-1)
    keep = mask.to(device)[:, None, :, None]
    # Padded positions hold zeros: whatever the model computed there never reaches a real row.
    keys = [torch.where(keep, layer.keys, 0.0) for layer in cache.layers]
    values = [torch.where(keep, layer.values, 0.0) for layer in cache.layers]
    return Prefill(loglik, logp[:, -1], Rows(keys, values, mask, length))


class DecodeBatch(Generic[M]):
    """The members decoding on one model, with their shared left-padded cache."""

    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        self.model, self.device = model, device
        self.members: list[M] = []
        self.rows: Rows | None = None
        self.decoder = decoder_for(model)  # the written-out step, where the family has one

    def __len__(self) -> int:
        return len(self.members)

    def join(self, members: Sequence[M], rows: Rows) -> None:
        parts = [rows] if self.rows is None else [self.rows, rows]
        self.rows = concat(parts, spare=max(16, *(p.length for p in parts)))
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
        # Columns before the first that any member still uses are padding for everyone.
        first = int(rows.mask[:, : rows.length].any(0).nonzero()[0])
        self.rows = rows.trimmed(first, rows.mask.shape[1]) if first else rows

    def subset(self, index: Sequence[int]) -> DecodeBatch[M]:
        """These members alone, in a batch of their own (copies of their cache rows)."""
        assert self.rows is not None
        part: DecodeBatch[M] = DecodeBatch(self.model, self.device)
        part.decoder = self.decoder
        part.members = [self.members[i] for i in index]
        part.rows = self.rows.select(index)
        return part

    def rebuild(self, parts: Sequence[DecodeBatch[M]]) -> None:
        """Become the members of ``parts`` (batches stepped alike, from ``subset``)."""
        self.members = [m for part in parts for m in part.members]
        rows = [part.rows for part in parts if part.rows is not None]
        self.rows = concat(rows, spare=max(16, *(r.length for r in rows))) if rows else None

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each member its next token (in ``members`` order); [B, V] float32 log-probs."""
        assert self.rows is not None and len(tokens) == len(self.members)
        rows = self.rows
        if rows.length == rows.mask.shape[1]:  # full: double the room
            rows = rows.trimmed(0, 2 * rows.length)
        rows.mask[:, rows.length] = True
        mask = rows.mask[:, : rows.length + 1].to(self.device)
        positions = mask.long().sum(-1) - 1
        ids = torch.tensor(list(tokens), device=self.device)
        if self.decoder is not None:
            logits = self.decoder(ids, positions, rows.keys, rows.values, rows.length, mask)
        else:
            layers = [
                _BufferLayer(k, v, rows.length) for k, v in zip(rows.keys, rows.values, strict=True)
            ]
            out = self.model(
                input_ids=ids[:, None],
                attention_mask=mask.long(),
                position_ids=positions[:, None],
                past_key_values=Cache(layers=layers),
                use_cache=True,
            )
            logits = out.logits[:, -1]
        self.rows = Rows(rows.keys, rows.values, rows.mask, rows.length + 1)
        return torch.log_softmax(logits.float(), dim=-1).cpu()

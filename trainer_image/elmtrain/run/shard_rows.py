"""A dim-0-sharded tensor's rows, sent to the first rank a slice at a time (``run/export.py``).

``DTensor.full_tensor`` gathers the whole tensor on every rank: a vocabulary-sized matrix
whole, plus the gather's own buffer, on each rank at once, when only the rank that writes the
file needs the values, and only in order. An FSDP2 shard of a parameter is a contiguous run of
its first dimension (``torch.chunk``'s split), so the file's bytes are the ranks' rows in rank
order: each rank sends its own rows in slices, and the first rank receives each slice into a
buffer of that size. No rank holds more of a tensor than its shard and one slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

SLICE_BYTES = 16 << 20  # at most this much of one tensor travels at a time


def row_slices(tensor: torch.Tensor, slice_bytes: int = SLICE_BYTES) -> Iterator[torch.Tensor]:
    """On the first rank of ``tensor``'s mesh: its values in row order, a host-memory slice of
    rows at a time. On the others: nothing (they send their rows as the first rank asks for
    them). Every rank of the mesh must iterate it to the end, together."""
    if not isinstance(tensor, DTensor):
        yield tensor.detach().to("cpu")
        return
    if tensor.dim() == 0 or not all(isinstance(p, Shard) and p.dim == 0 for p in tensor.placements):
        full = tensor.full_tensor()  # not an FSDP2 shard of rows: gathered whole, as before
        if tensor.device_mesh.get_local_rank() == 0:
            yield full.detach().to("cpu")
        return
    mesh = tensor.device_mesh
    ranks = dist.get_process_group_ranks(mesh.get_group())
    me = mesh.get_local_rank()
    local = tensor.to_local().detach()
    rows, rest = tensor.shape[0], list(tensor.shape[1:])
    per_rank = math.ceil(rows / len(ranks))
    row_bytes = max(1, math.prod(rest) * tensor.element_size())
    step = max(1, slice_bytes // row_bytes)
    for rank in range(len(ranks)):
        count = max(0, min(per_rank, rows - rank * per_rank))
        for start in range(0, count, step):
            size = min(step, count - start)
            if me == 0 and rank == 0:
                yield local[start : start + size].to("cpu")
            elif me == 0:
                piece = torch.empty([size, *rest], dtype=local.dtype, device=local.device)
                dist.recv(piece, src=ranks[rank])
                yield piece.to("cpu")
            elif me == rank:
                dist.send(local[start : start + size].contiguous(), dst=ranks[0])

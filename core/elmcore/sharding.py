"""Which sharding strategy a training run uses: the ``auto`` rule, as arithmetic.

With AdamW, every parameter costs about 16 bytes of training state on each rank that holds
it: 4 for the fp32 weight, 4 for its gradient, 8 for the two moments (bf16 autocast keeps the
weights in fp32, so it is 16 bytes either way). DDP keeps all of it on every rank; FSDP keeps
1/world_size of it, plus one gathered block at a time. Activations come on top, which is why
the rule leaves a share of the device for them. Pure: no torch, callable from the operator.
"""

from __future__ import annotations

from typing import Literal

Strategy = Literal["ddp", "fsdp"]

BYTES_PER_PARAMETER = 16  # fp32 weight + gradient + AdamW's two moments
# The share of a device that one full copy's training state may take before ``auto`` shards:
# the rest is for activations, the gathered blocks, the allocator's slack and the data.
DDP_MEMORY_SHARE = 0.5


def training_state_bytes(parameters: int, strategy: Strategy, world_size: int) -> int:
    """Bytes of weights, gradients and optimizer state on each rank (before activations)."""
    total = BYTES_PER_PARAMETER * parameters
    return total if strategy == "ddp" else -(-total // max(1, world_size))


def choose_strategy(
    requested: Literal["auto", "ddp", "fsdp"],
    parameters: int,
    world_size: int,
    device_memory: int,
    offload_optimizer: bool = False,
) -> Strategy:
    """The strategy of a run: ``requested`` unless it is ``auto``.

    ``auto``: fsdp when the optimizer state is offloaded (only fsdp does that); otherwise one
    process trains plainly ("ddp" with nothing to synchronise), and several ranks shard when a
    full copy's training state would take more than ``DDP_MEMORY_SHARE`` of one device's memory.
    """
    if requested != "auto":
        return requested
    if offload_optimizer:
        return "fsdp"
    if world_size <= 1:
        return "ddp"
    full_copy = training_state_bytes(parameters, "ddp", world_size)
    return "fsdp" if full_copy > DDP_MEMORY_SHARE * device_memory else "ddp"

"""Faster modules with the same math, swapped into a model before it trains.

GPT-2's ``gelu_new`` is written as five elementwise tensor operations (pow, mul, add, tanh,
mul), each a pass over the MLP's activations with its own saved tensor for backward; torch's
``gelu(approximate="tanh")`` is the same function in one fused kernel (transformers names it
``gelu_pytorch_tanh``; the two differ by float rounding, under 1e-6). Only module instances
change, never the config or the weights, so checkpoints and exports load as before.
"""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN, NewGELUActivation


def fuse_activations(model: nn.Module) -> int:
    """Replace every ``gelu_new`` module of ``model`` with the fused kernel; how many."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    return swapped

"""Each expert's mean hidden state entering every layer's feed-forward block, on its own text.

Measured on the dense expert itself (one loaded at a time), whose feed-forward input is what
the Mixtral block's router sees in the mix up to the averaged attention.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from elmcore.errors import BadInputError
from elmtrain.model.families import load_model

_MLP_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


def expert_centroids(
    model_dir: Path, sequences: torch.Tensor, device: torch.device, batch_size: int = 8
) -> np.ndarray:
    """``(layers, hidden)``: the mean over every token of ``sequences`` (windows of token ids)
    of the input to each layer's MLP, accumulated in float64."""
    if len(sequences) == 0:
        raise BadInputError(f"{model_dir}: no validation windows to measure its centroids on")
    model = load_model(model_dir, device)
    blocks = {
        int(match[1]): module
        for name, module in model.named_modules()
        if (match := _MLP_MODULE.search(name)) is not None
    }
    if not blocks:
        raise BadInputError(f"{model_dir}: no layers.<n>.mlp modules to measure")
    hidden = int(model.config.hidden_size)
    sums = torch.zeros(len(blocks), hidden, dtype=torch.float64, device=device)
    tokens = 0

    def hook(layer: int) -> object:
        def record(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            sums[layer] += inputs[0].reshape(-1, hidden).to(torch.float64).sum(dim=0)

        return record

    handles = [blocks[i].register_forward_pre_hook(hook(i)) for i in sorted(blocks)]
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size].to(device)
                model(input_ids=batch)
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (sums / tokens).cpu().numpy()

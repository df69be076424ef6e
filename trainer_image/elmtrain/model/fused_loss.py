"""Causal-LM loss with the output layer and cross-entropy fused (as Liger's and Apple's Cut
Cross-Entropy kernels do, here in plain torch).

The usual path materialises the logits, a log-softmax copy saved for backward, and a gradient
of the same size: three passes over a tokens x vocabulary tensor that costs more memory traffic
than the model's layers at small widths. Here the forward pass computes, chunk by chunk, the
loss and the gradients of the hidden states and the output weights at once (softmax minus
one-hot, in place), and backward only scales them. Same FLOPs, one logits buffer per chunk,
and the result matches ``model(input_ids, labels=input_ids).loss`` to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

# Logits held at once, per chunk of rows (twice that for a moment: the logits and their
# log-softmax): bounds peak memory for large vocabularies while keeping each matmul large
# enough to run at full speed (small chunks are slower on CPU).
CHUNK_BYTES = 256 * 1024 * 1024


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab_size))


def _compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
    ) -> torch.Tensor:
        # Matmuls in the autocast dtype (bf16 on GPU), softmax and gradients' sums in fp32,
        # as the model's own loss does (it upcasts the logits).
        dtype = _compute_dtype(hidden.device, weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(dtype)
                y = targets[start : start + rows]
                logits = (h @ w.t()).float()
                if bias is not None:
                    logits += bias.float()
                # One fused pass for the log-probabilities (logsumexp, then subtracting it and
                # exponentiating, took three passes and a temporary of the logits' size).
                log_probs = torch.log_softmax(logits, dim=1)
                del logits
                total -= log_probs.gather(1, y[:, None]).sum()
                # d(loss)/d(logits) = softmax - one_hot, computed in the log-probabilities' buffer.
                grad = log_probs.exp_()
                grad[torch.arange(grad.shape[0], device=grad.device), y] -= 1.0
                g = grad.to(dtype)  # the same tensor in fp32
                # The products written and accumulated in place (GEMM's own beta), when the
                # dtypes allow: no temporary of their size and no pass to copy or add it.
                if grad_hidden.dtype == dtype:
                    torch.mm(g, w, out=grad_hidden[start : start + rows])
                else:
                    grad_hidden[start : start + rows] = g @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += g.t() @ h
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
        count = hidden.shape[0]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.count, ctx.weight_dtype = count, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output / ctx.count
        bias_grad = None if grad_bias is None else (grad_bias * scale).to(ctx.weight_dtype)
        return (
            grad_hidden * scale.to(grad_hidden.dtype),
            (grad_weight * scale).to(ctx.weight_dtype),
            bias_grad,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` (rows x d)."""
    chunk = rows or chunk_rows(weight.shape[0])
    loss: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)  # type: ignore[no-untyped-call]
    return loss


def router_aux_coef(config: Any) -> float | None:
    """The load-balancing loss's weight when ``config`` is a mixture-of-experts model that asks
    for it (``output_router_logits``, as Mixtral's own loss adds it only then), else None."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if not experts or not getattr(config, "output_router_logits", False) or coef == 0.0:
        return None
    return coef


class CausalLMLoss(nn.Module):
    """``forward(input_ids)`` -> the next-token loss of ``model``, with the fused output layer.

    A module (not a function) so DDP and ``torch.compile`` wrap it like the model itself.
    Sequences are packed (no padding), so every next token counts. For a mixture-of-experts
    model whose config asks for it (``output_router_logits``, ``router_aux_loss_coef`` > 0),
    the routers' load-balancing loss (Switch Transformer's, transformers'
    ``load_balancing_loss_func`` over every layer's router logits of this batch) is added
    with that weight, as ``MixtralForCausalLM``'s own loss adds it: the training loop and the
    sharding never need to know.
    """

    def __init__(self, model: PreTrainedModel, rows: int | None = None) -> None:
        super().__init__()
        self.model, self.rows = model, rows
        self.aux_coef = router_aux_coef(model.config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        routed = {"output_router_logits": True} if self.aux_coef is not None else {}
        out = self.model.base_model(input_ids=input_ids, use_cache=False, **routed)
        hidden = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
        head = self.model.get_output_embeddings()
        assert isinstance(head, nn.Linear), "a causal LM's output layer is a Linear"
        targets = input_ids[:, 1:].reshape(-1)
        loss = linear_cross_entropy(hidden, head.weight, head.bias, targets, self.rows)
        if self.aux_coef is not None:
            loss = loss + self.aux_coef * self._load_balancing(out.router_logits)
        return loss

    def _load_balancing(self, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        config = self.model.config
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        aux = load_balancing_loss_func(router_logits, experts, config.num_experts_per_tok)
        assert isinstance(aux, torch.Tensor), "router logits were asked for"
        return aux.float()

"""One decoding step of the trainer's two families, written out with the model's own weights.

A decoding step reads one token per sequence: the work is a few small matrix products per
layer, and transformers' general forward (cache objects, mask builders, output classes) costs
as much again in Python. These functions do the same arithmetic directly on the batch's
left-padded cache buffers (``kvbatch.Rows``); tests check them against transformers' forward.
Configurations they do not cover (other activations, RoPE scaling, attention variants) use
the general forward instead (``decoder_for`` returns None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812  (the usual name)
from transformers import PreTrainedModel

# (tokens [B], positions [B], keys, values (per layer [B, H, C, D]), length, mask [B, length+1])
# -> logits [B, V]; writes the new keys and values at column ``length``.
Decoder = Callable[
    [torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], int, torch.Tensor],
    torch.Tensor,
]
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def decoder_for(model: PreTrainedModel) -> Decoder | None:
    config = model.config
    if config.model_type == "gpt2" and _gpt2_supported(config):
        return _gpt2(model)
    if config.model_type == "llama" and _llama_supported(config):
        return _llama(model)
    return None


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    mask: torch.Tensor,
    groups: int = 1,
) -> torch.Tensor:
    """Write this step's k, v at ``length``; attend q [B, H, 1, D] over the real positions."""
    keys[:, :, length] = k
    values[:, :, length] = v
    return F.scaled_dot_product_attention(
        q,
        keys[:, :, : length + 1],
        values[:, :, : length + 1],
        attn_mask=mask[:, None, None, :],
        enable_gqa=groups > 1,
    )


def _gpt2_supported(config: Any) -> bool:
    return (
        config.activation_function in _GELU
        and not getattr(config, "scale_attn_by_inverse_layer_idx", False)
        and not getattr(config, "reorder_and_upcast_attn", False)
        and getattr(config, "scale_attn_weights", True)
    )


def _gpt2(model: PreTrainedModel) -> Decoder:
    body = model.transformer
    config = model.config
    heads, width = config.n_head, config.n_embd
    size = width // heads
    approximate = _GELU[config.activation_function]
    head = model.lm_head.weight

    def step(
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch = len(tokens)
        x = F.embedding(tokens, body.wte.weight) + F.embedding(positions, body.wpe.weight)
        for i, block in enumerate(body.h):
            a = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
            qkv = torch.addmm(block.attn.c_attn.bias, a, block.attn.c_attn.weight)
            q, k, v = qkv.view(batch, 3, heads, size).unbind(1)
            out = _attend(q[:, :, None], keys[i], values[i], k, v, length, mask)
            x = x + torch.addmm(
                block.attn.c_proj.bias, out.reshape(batch, width), block.attn.c_proj.weight
            )
            h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
            h = F.gelu(
                torch.addmm(block.mlp.c_fc.bias, h, block.mlp.c_fc.weight), approximate=approximate
            )
            x = x + torch.addmm(block.mlp.c_proj.bias, h, block.mlp.c_proj.weight)
        x = F.layer_norm(x, (width,), body.ln_f.weight, body.ln_f.bias, body.ln_f.eps)
        logits: torch.Tensor = x @ head.T
        return logits

    return step


def _llama_supported(config: Any) -> bool:
    scaling = getattr(config, "rope_scaling", None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return (
        config.hidden_act == "silu"
        and rope_type in (None, "default")
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
    )


def _llama(model: PreTrainedModel) -> Decoder:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    body = model.model
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    size = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.lm_head.weight

    def norm(x: torch.Tensor, layer: Any) -> torch.Tensor:
        """RMSNorm as transformers computes it (in float32, then back)."""
        squared = x.float().pow(2).mean(-1, keepdim=True)
        normed = (x.float() * torch.rsqrt(squared + layer.variance_epsilon)).to(x.dtype)
        scaled: torch.Tensor = layer.weight * normed
        return scaled

    def step(
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch = len(tokens)
        x = F.embedding(tokens, body.embed_tokens.weight)
        cos, sin = body.rotary_emb(x[:, None], positions[:, None])
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            a = norm(x, layer.input_layernorm)
            q = F.linear(a, attn.q_proj.weight).view(batch, heads, 1, size)
            k = F.linear(a, attn.k_proj.weight).view(batch, kv_heads, 1, size)
            v = F.linear(a, attn.v_proj.weight).view(batch, kv_heads, 1, size)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = _attend(q, keys[i], values[i], k[:, :, 0], v[:, :, 0], length, mask,
                          groups=heads // kv_heads)  # fmt: skip
            x = x + F.linear(out.reshape(batch, heads * size), attn.o_proj.weight)
            h = norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            h = F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)
            x = x + F.linear(h, mlp.down_proj.weight)
        logits: torch.Tensor = norm(x, body.norm) @ head.T
        return logits

    return step

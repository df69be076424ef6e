"""Which dense tensor becomes which Mixtral tensor, and the Mixtral config: pure, no I/O.

The output uses the per-expert layout ``block_sparse_moe.experts.<i>.w1/w2/w3`` that
``MixtralForCausalLM.save_pretrained`` writes (transformers 5 fuses the experts into 3-D
tensors in memory and converts on load; 4.x, vLLM and mergekit read this layout as it is), so
each expert's tensors are whole tensors of their own and can be copied one expert at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from elmcore.errors import BadInputError

# Families whose decoder layer is Mixtral's with a dense SwiGLU MLP in place of the MoE block.
MIXABLE = ("llama", "mistral")
# Dense SwiGLU projection -> Mixtral expert projection (w1: gate, w3: up, w2: down).
_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MLP = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+))\.mlp\.(?P<proj>\w+)\.weight$")
# Dense config keys that mean the same in a Mixtral config (copied when present).
_SHARED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_dropout",
    "sliding_window",
    "rope_parameters",
    "rope_theta",  # configs written by transformers 4.x
    "rope_scaling",
    "dtype",
    "torch_dtype",
)


def check_mixable(config: Mapping[str, Any], where: str) -> None:
    """Refuse a dense model whose layers have no Mixtral counterpart."""
    family = config.get("model_type")
    if family not in MIXABLE:
        raise BadInputError(
            f"{where}: a {family} model cannot be mixed; mixing makes a Mixtral model from "
            f"Llama-family experts ({', '.join(MIXABLE)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise BadInputError(f"{where}: {flag} is set; Mixtral's layers have no biases")


def mixtral_config(dense: Mapping[str, Any], num_experts: int, top_k: int) -> dict[str, Any]:
    """The Mixtral config of ``num_experts`` dense experts of config ``dense``, ``top_k``
    experts per token (the load-balancing loss off until the mix is finetuned)."""
    check_mixable(dense, "the experts")
    if not 1 <= top_k <= num_experts:
        raise BadInputError(f"--top-k {top_k}: choose 1 to {num_experts} (the experts mixed)")
    config = {k: dense[k] for k in _SHARED_CONFIG_KEYS if k in dense}
    config.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        output_router_logits=False,
        router_aux_loss_coef=0.01,  # BTX's load-balancing weight, for the finetuning
        router_jitter_noise=0.0,
    )
    return config


def expert_name(name: str, index: int) -> str | None:
    """The Mixtral name of dense MLP tensor ``name`` in expert slot ``index`` (None: not an
    MLP projection, so a tensor every expert shares and the mix averages)."""
    match = _MLP.match(name)
    if match is None:
        return None
    projection = _PROJECTIONS.get(match["proj"])
    if projection is None:
        raise BadInputError(f"{name}: an MLP tensor Mixtral has no place for")
    return f"{match['prefix']}.block_sparse_moe.experts.{index}.{projection}.weight"


def shared_names(names: Iterable[str]) -> list[str]:
    """The tensors averaged across experts: all but the MLP projections, in their order."""
    return [n for n in names if _MLP.match(n) is None]


def expert_names(names: Iterable[str], index: int) -> dict[str, str]:
    """Dense MLP tensor name -> its Mixtral name for expert slot ``index``."""
    mapped = {n: expert_name(n, index) for n in names}
    return {n: m for n, m in mapped.items() if m is not None}


def router_name(prefix: str, layer: int) -> str:
    """The router (``gate``) weight of a layer; ``prefix`` is the layers' parent (``model``)."""
    return f"{prefix}.layers.{layer}.block_sparse_moe.gate.weight"


def layers_prefix(names: Iterable[str]) -> str:
    """Where the decoder layers sit (``model`` for LlamaForCausalLM)."""
    for name in names:
        match = _MLP.match(name)
        if match is not None:
            return match["prefix"].rsplit(".layers.", 1)[0]
    raise BadInputError("the experts have no MLP projections to mix")

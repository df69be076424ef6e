"""Build, load and save causal LMs in Hugging Face format (config.json + model.safetensors)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from elmcore.errors import BadInputError
from elmtrain.config import ModelConfig

# A progress bar per loaded model is noise in Job logs and in loops that load many experts.
hf_logging.disable_progress_bar()


def build_model(config: ModelConfig, vocab_size: int, eos_id: int, seed: int) -> PreTrainedModel:
    """A freshly initialised model; the same seed gives the same weights."""
    hf_config: Any
    ffn = int(config.d_model * config.ffn_multiplier)
    if config.family == "gpt2":
        hf_config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=config.context_length,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=ffn,
            # No dropout: modern LM pretraining skips it, and it keeps runs reproducible.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=config.tie_embeddings,
        )
    else:
        hf_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=config.d_model,
            intermediate_size=ffn,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads or config.n_heads,
            max_position_embeddings=config.context_length,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=config.tie_embeddings,
        )
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(hf_config)
    return model


def load_model(
    directory: Path, device: torch.device | None = None, dtype: torch.dtype | str = torch.float32
) -> PreTrainedModel:
    """The HF model in ``directory``, in eval mode. ``dtype="auto"`` keeps the folder's own
    dtype: what scoring uses, so a bf16 expert takes one copy of its bytes, not two (fp32)."""
    if not (directory / "config.json").is_file():
        raise BadInputError(f"{directory} holds no config.json: not a Hugging Face model")
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        # Shape mismatches (a checkpoint of another architecture) land here too.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise BadInputError(f"cannot load the model in {directory}: {first_line}") from None
    model.eval()
    return model.to(device) if device is not None else model


def save_model(model: PreTrainedModel, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    # Generation defaults are not part of an expert's identity; keep the folder to two files.
    (directory / "generation_config.json").unlink(missing_ok=True)


def context_length(model: PreTrainedModel) -> int:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise BadInputError("the model config states no context length")


def check_vocab(model: PreTrainedModel, vocab_size: int, where: str) -> None:
    """The model has an embedding row for every token; more (a vocabulary padded to a
    multiple of 64 or 128, as Pythia's is) is fine: those rows are never a target."""
    if int(model.config.vocab_size) < vocab_size:
        raise BadInputError(
            f"{where}: the model's vocabulary ({model.config.vocab_size}) is smaller than the "
            f"forest tokenizer's ({vocab_size})"
        )


# Config fields that put something between the output projection and the softmax.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping
    "logit_scale": 1.0,  # Cohere
    "logits_scaling": 1.0,  # Granite: logits divided by it
    "output_multiplier_scale": 1.0,
}

# Classes whose own loss is a plain output projection and cross-entropy, by their code:
# tests/trainer/test_fused_loss.py proves elmtrain's loss equal to theirs with the installed
# transformers. Their check needs no forward pass, which on a sharded model gathers the
# vocabulary-sized matrices on every rank at once (the peak of a pretrained load, measured).
KNOWN_PLAIN_HEADS: tuple[type[PreTrainedModel], ...] = (LlamaForCausalLM, GPT2LMHeadModel)


def check_trainable(
    model: PreTrainedModel, where: str, loss: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Refuse a model whose own loss is not the one elmtrain trains (the output layer as a
    plain projection, fused with cross-entropy): by its config where it says so, by its class
    where elmtrain's tests know its code (``KNOWN_PLAIN_HEADS``), else by comparing both
    losses on a few random tokens (``loss``: the engine computing elmtrain's,
    for a model placed on its ranks; every rank must call it then)."""
    from elmtrain.model.fused_loss import CausalLMLoss

    for field, plain in _LOGIT_TRANSFORMS.items():
        value = getattr(model.config, field, plain)
        if value is not None and value != plain:
            raise BadInputError(
                f"{where}: {model.config.model_type} transforms its logits ({field}={value}); "
                "elmtrain's loss uses the output projection as it is and would train on "
                "another objective, so it does not train this model"
            )
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise BadInputError(f"{where}: the model's output layer is not a linear projection")
    if type(model) in KNOWN_PLAIN_HEADS:  # exactly: a subclass may change the forward
        return
    generator = torch.Generator().manual_seed(0)
    length = min(16, context_length(model))
    ids = torch.randint(0, int(model.config.vocab_size), (2, length), generator=generator)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        own = float(model(input_ids=ids.to(model.device), labels=ids.to(model.device)).loss)
        ours = float((loss or CausalLMLoss(model))(ids.to(model.device)))
    model.train(was_training)
    if abs(own - ours) > 1e-3 * max(1.0, abs(own)):
        raise BadInputError(
            f"{where}: the model's own loss ({own:.4f}) differs from a plain output "
            f"projection's ({ours:.4f}) on the same tokens; elmtrain does not train it"
        )

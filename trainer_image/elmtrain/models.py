"""Build, load and save causal LMs in Hugging Face format (config.json + model.safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel
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


def load_model(directory: Path, device: torch.device | None = None) -> PreTrainedModel:
    if not (directory / "config.json").is_file():
        raise BadInputError(f"{directory} holds no config.json: not a Hugging Face model")
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32
        )
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
    if int(model.config.vocab_size) != vocab_size:
        raise BadInputError(
            f"{where}: the model's vocabulary ({model.config.vocab_size}) does not match the "
            f"forest tokenizer ({vocab_size})"
        )

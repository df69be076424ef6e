"""Typed configs of the model architecture and of a training run (they travel as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from elmcore.errors import BadInputError

C = TypeVar("C", bound=BaseModel)


class ModelConfig(BaseModel):
    """A small causal LM architecture, built with transformers (no hub download)."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["gpt2", "llama"] = "gpt2"
    d_model: int = Field(64, ge=8, le=16384)
    n_layers: int = Field(2, ge=1, le=256)
    n_heads: int = Field(2, ge=1, le=256)
    n_kv_heads: int | None = Field(None, ge=1, le=256, description="llama: grouped-query heads")
    ffn_multiplier: float = Field(4.0, gt=0, le=16)
    context_length: int = Field(128, ge=8, le=131072)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        return self


class TrainingConfig(BaseModel):
    """Hyperparameters of one training run (seed or branch)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=0, le=10_000_000)
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step, all ranks")
    micro_batch_size: int | None = Field(None, ge=1, description="per rank; default: no accum")
    seq_len: int = Field(128, ge=8, le=131072)
    learning_rate: float = Field(3e-3, gt=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    seed: int = Field(0, ge=0)
    checkpoint_interval: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    progress_interval_seconds: float = Field(10.0, gt=0)
    eval_batches: int = Field(16, ge=1, description="validation batches for perplexity")


def load_json_arg(text: str | None, what: str) -> dict[str, object]:
    """A JSON object given inline or as ``@path`` (so Job specs can pass it either way)."""
    if not text:
        return {}
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{what}: cannot read JSON ({error})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{what}: expected a JSON object")
    return value


def parse_config(cls: type[C], data: dict[str, object], what: str) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BadInputError(f"{what}: {field}: {first['msg']}") from None

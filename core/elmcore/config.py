"""Typed configs of the model architecture and of a training run.

Shared by the trainer (which runs them) and the operator (whose CRDs expose them), so the bounds
live in one place.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class ModelConfig(BaseModel):
    """A small causal LM architecture, built with transformers (no hub download)."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["gpt2", "llama"] = Field("gpt2", description="architecture family")
    d_model: int = Field(64, ge=8, le=16384, description="hidden size")
    n_layers: int = Field(2, ge=1, le=256, description="transformer blocks")
    n_heads: int = Field(2, ge=1, le=256, description="attention heads")
    n_kv_heads: int | None = Field(None, ge=1, le=256, description="llama: grouped-query heads")
    ffn_multiplier: float = Field(4.0, gt=0, le=16, description="MLP width / hidden size")
    context_length: int = Field(128, ge=8, le=131072, description="maximum positions")
    tie_embeddings: bool = Field(True, description="share input and output embeddings")

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

    steps: int = Field(100, ge=0, le=10_000_000, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step, all ranks")
    micro_batch_size: int | None = Field(None, ge=1, description="per rank; default: no accum")
    seq_len: int = Field(128, ge=8, le=131072, description="tokens per training sequence")
    learning_rate: float = Field(3e-3, gt=0, le=1, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warmup"
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    compile: bool = Field(False, description="torch.compile the model")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="how ranks hold the model: ddp (a full copy each), fsdp (FSDP2 shards of "
        "parameters, gradients and optimizer state), auto (fsdp when a full copy's training "
        "state would not fit; see docs/trainer.md)",
    )
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward (less memory)"
    )
    offload_optimizer: bool = Field(
        False, description="fsdp: keep parameters, gradients and optimizer state in host memory"
    )
    seed: int = Field(0, ge=0, description="random seed (data order, init)")
    checkpoint_interval: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="committed checkpoints kept")
    progress_interval_seconds: float = Field(
        10.0, gt=0, description="seconds between progress records"
    )
    eval_batches: int = Field(16, ge=1, description="validation batches for perplexity")
    eval_interval: int | None = Field(
        None,
        ge=1,
        description="steps between validation perplexities kept as the learning curve "
        "(metrics.curve); unset: before and after training only",
    )

    @field_validator("offload_optimizer")
    @classmethod
    def _offload_needs_fsdp(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("strategy") == "ddp":
            raise ValueError("offloading the optimizer needs strategy fsdp (or auto), not ddp")
        return value

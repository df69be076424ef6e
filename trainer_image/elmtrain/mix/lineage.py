"""``mix.json``: what a mixed model was made of, written beside its weights; ``mix-train``
appends each finetuning of it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from elmcore.names import Domain
from elmcore.records import Metrics, Record, SourceFile, utc_now
from elmtrain.mix.router import RouterInit

LINEAGE_FILE = "mix.json"


class MixedExpert(Record):
    domain: Domain
    version: int = Field(ge=1)
    sha256: str  # the expert artifact's commit marker: the exact bytes mixed
    path: str
    slot: int = Field(ge=0)  # its index among the Mixtral experts
    weight: float = Field(ge=0)  # its share of the averaged (attention, embedding) tensors


class MixFinetune(Record):
    """One ``elmtrain mix-train`` of the mix: from which committed bytes, on which text, how."""

    run_id: str
    mix: str  # the finetuned folder's location, as given
    mix_sha256: str  # its commit marker's sha256
    steps: int = Field(ge=0)
    router_only: bool
    aux_loss_coef: float = Field(ge=0)
    data: list[SourceFile]  # training text, with the content hashes tokenized
    val_data: list[SourceFile] = Field(default_factory=list)
    training: dict[str, Any]  # the effective TrainingConfig
    metrics: Metrics
    image: str | None = None
    elmtrain_version: str = "unknown"
    created_at: str = Field(default_factory=utc_now)


class MixLineage(Record):
    experts: list[MixedExpert]
    average: Literal["uniform", "posterior"]
    router: RouterInit
    router_seed: int | None = None  # random
    centroid_sequences: int | None = None  # centroids: validation windows per expert
    seq_len: int | None = None
    top_k: int = Field(ge=1)
    family: str  # of the dense experts
    manifest_revision: int = Field(ge=0)
    elmtrain_version: str = "unknown"
    created_at: str = Field(default_factory=utc_now)
    finetunes: list[MixFinetune] = Field(default_factory=list)  # oldest first

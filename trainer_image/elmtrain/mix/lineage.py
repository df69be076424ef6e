"""``mix.json``: what a mixed model was made of, written beside its weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from elmcore.names import Domain
from elmcore.records import Record, utc_now
from elmtrain.mix.router import RouterInit

LINEAGE_FILE = "mix.json"


class MixedExpert(Record):
    domain: Domain
    version: int = Field(ge=1)
    sha256: str  # the expert artifact's commit marker: the exact bytes mixed
    path: str
    slot: int = Field(ge=0)  # its index among the Mixtral experts
    weight: float = Field(ge=0)  # its share of the averaged (attention, embedding) tensors


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

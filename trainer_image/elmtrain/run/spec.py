"""What a training job (seed or branch) is asked to do: the command line, parsed and checked.

Its own module so that the lineage record and the job runner both read it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from elmcore.records import ClusterLineage, Parent
from elmtrain.config import TrainingConfig


@dataclass
class JobSpec:
    kind: Literal["seed", "expert"]
    run_id: str
    out_key: str
    train_data: list[str]
    val_data: list[str]
    training: TrainingConfig
    domain: str | None = None
    version: int | None = None
    init_strategy: str | None = None
    parents: list[Parent] = field(default_factory=list)
    merge: bool = False
    pretrained: str | None = None  # the seed's imported weights
    cluster: ClusterLineage | None = None  # branch --cluster: the cluster it was trained on

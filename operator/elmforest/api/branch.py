"""``ElmBranch``: one domain's expert, trained from the forest and merged into it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from elmcore.btm import InitStrategy
from elmforest.api import rules
from elmforest.api.base import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    Condition,
    SpecModel,
    StatusModel,
    partial_model,
)
from elmforest.api.forest import IMMUTABLE, Locations, TrainerSpec, TrainingSpec
from elmforest.api.rules import validations

if TYPE_CHECKING:
    TrainerOverrides = SpecModel
else:
    TrainerOverrides = partial_model(
        TrainerSpec,
        "TrainerOverrides",
        "Per-branch overrides of the forest's trainer settings (the image stays the forest's).",
        exclude=frozenset({"image", "image_pull_policy", "service_account_name"}),
    )


class DataSpec(SpecModel):
    """The domain's text: .txt (documents split by two blank lines), .jsonl, optionally .gz."""

    train: Locations = Field(min_length=1, max_length=64, description="training text")
    validation: Locations = Field(
        default_factory=list,
        max_length=64,
        description="held-out text for perplexity before and after training",
    )
    test: Locations = Field(
        default_factory=list,
        max_length=64,
        description="text for reports only (never trained on); unset: the validation text",
    )


class InitSpec(SpecModel):
    """How the new ELM's parameters start (BTM: the posterior-weighted average)."""

    model_config = SpecModel.model_config | {
        "json_schema_extra": validations(rules.COPY_NEEDS_SOURCE)
    }

    strategy: InitStrategy = Field(
        InitStrategy.POSTERIOR,
        description="seed, copy (one ELM), uniform (average of all), posterior (BTM default)",
    )
    top_k: int | None = Field(None, ge=1, le=1024, description="posterior: keep the k most likely")
    sample_size: int = Field(64, ge=1, le=100_000, description="sequences to estimate posterior")
    copy_from: str | None = Field(
        None, max_length=63, pattern=DNS1123_LABEL, description="copy: the domain to copy"
    )

    @model_validator(mode="after")
    def _rules(self) -> InitSpec:
        rules.enforce(self, rules.COPY_NEEDS_SOURCE)
        return self


class ClusterRef(SpecModel):
    """Set by an ``ElmClusterSet`` on the branches it generates: the cluster whose documents
    the branch trains on, recorded in the expert's lineage (routing by cluster reads it)."""

    set: str = Field(
        max_length=63, pattern=DNS1123_LABEL, description="the set version's storage name"
    )
    index: int = Field(ge=0, le=255, description="the cluster's index in its clusterer")
    clusterer_sha256: str = Field(
        pattern="^[0-9a-f]{64}$", description="the clusterer that made the cluster"
    )


class ElmBranchSpec(SpecModel):
    forest: str = Field(
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="the ElmForest (same namespace) this branch grows from",
        json_schema_extra=IMMUTABLE,
    )
    domain: str = Field(
        max_length=63,
        pattern=DNS1123_LABEL,
        description="the domain this ELM specialises in; one branch per domain and forest",
        json_schema_extra=IMMUTABLE,
    )
    data: DataSpec
    init: InitSpec = Field(default_factory=InitSpec)
    training: TrainingSpec | None = Field(
        None, description="overrides of the forest's branchDefaults; a change trains a new version"
    )
    trainer: TrainerOverrides | None = Field(None, description="resources and placement")
    suspend: bool = Field(False, description="stop scheduling new Jobs (a running one is kept)")
    retention: Literal["Keep", "Delete"] = Field(
        "Keep", description="on deletion, keep or delete the expert's files and runs"
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Jobs tried per version before the branch fails"
    )
    cluster: ClusterRef | None = Field(
        None, description="set by an ElmClusterSet: the cluster this branch's data is"
    )


# ---- status -------------------------------------------------------------------------------

BranchPhase = Literal[
    "Pending",
    "Waiting",
    "Preparing",
    "Initializing",
    "Training",
    "Evaluating",
    "Merging",
    "Merged",
    "Failed",
    "Suspended",
]


class ProgressStatus(StatusModel):
    step: int = 0
    total_steps: int = 0
    tokens_per_second: float = 0.0
    eta_seconds: float | None = None
    summary: str = ""  # "40/100 (40%)", for the printer column


class InitStatus(StatusModel):
    strategy: str
    weights: dict[str, float] = Field(default_factory=dict)  # "seed" or "<domain>.v<n>"


class CheckpointStatus(StatusModel):
    uri: str
    sha256: str


class MetricsStatus(StatusModel):
    val_perplexity_before: float | None = None
    val_perplexity_after: float | None = None
    train_tokens: int = 0
    seconds: float = 0.0


class ElmBranchStatus(StatusModel):
    phase: BranchPhase = "Pending"
    message: str = ""
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    version: int | None = None
    spec_hash: str | None = None
    attempt: int = 0
    job_name: str | None = None
    progress: ProgressStatus | None = None
    init: InitStatus | None = None
    checkpoint: CheckpointStatus | None = None
    metrics: MetricsStatus | None = None
    merged_version: int | None = None
    manifest_revision: int | None = None

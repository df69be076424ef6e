"""``ElmClusterSet``: domains found, not given (c-BTM, issue 30). One unlabeled corpus is
clustered (tf-idf, balanced k-means, fitted on a bounded sample), every document is assigned
to a cluster, and each cluster becomes an ``ElmBranch`` named ``<set>-c<i>``.

The operator fits the clusterer in a CPU Job, assigns every document in an Indexed Job and
applies the branches (planner/clusterset.py); the trainer's side is ``elmtrain cluster-fit``,
``cluster-assign`` and ``assign`` (docs/clustering.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from elmforest.api import rules
from elmforest.api.base import DNS1123_SUBDOMAIN, Condition, SpecModel, StatusModel
from elmforest.api.branch import InitSpec, TrainerOverrides
from elmforest.api.forest import IMMUTABLE, Locations, TrainingSpec
from elmforest.api.rules import validations


class FeaturesSpec(SpecModel):
    """The tf-idf features the clusters are fitted on (scikit-learn's TfidfVectorizer)."""

    model_config = SpecModel.model_config | {"json_schema_extra": validations(rules.NGRAM_RANGE)}

    max_features: int = Field(
        50_000, ge=1, le=1_000_000, description="vocabulary size: the most frequent terms kept"
    )
    ngram_min: int = Field(1, ge=1, le=3, description="shortest n-gram counted")
    ngram_max: int = Field(1, ge=1, le=3, description="longest n-gram counted")

    @model_validator(mode="after")
    def _rules(self) -> FeaturesSpec:
        rules.enforce(self, rules.NGRAM_RANGE)
        return self


class BranchTemplate(SpecModel):
    """What every generated branch (``<set>-c<i>``) takes; data and domain come from the set."""

    init: InitSpec = Field(default_factory=InitSpec)
    training: TrainingSpec | None = Field(
        None, description="overrides of the forest's branchDefaults"
    )
    trainer: TrainerOverrides | None = Field(None, description="resources and placement")
    retention: Literal["Keep", "Delete"] = Field(
        "Keep", description="on deletion of the set, keep or delete the experts' files"
    )
    max_attempts: int = Field(3, ge=1, le=20, description="Jobs tried per branch version")


class ElmClusterSetSpec(SpecModel):
    model_config = SpecModel.model_config | {
        "json_schema_extra": validations(rules.SAMPLE_COVERS_CLUSTERS)
    }

    forest: str = Field(
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="the ElmForest (same namespace) whose storage and seed the clusters use",
        json_schema_extra=IMMUTABLE,
    )
    data: Locations = Field(
        min_length=1,
        max_length=64,
        description="unlabeled text: files or prefixes of .txt and .jsonl ({'text': ...}), "
        "optionally .gz, as a branch's data.train",
    )
    clusters: int = Field(ge=1, le=256, description="k: clusters, and so generated branches")
    sample: int = Field(
        100_000, ge=1, le=10_000_000, description="documents (a uniform sample) used to fit"
    )
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    balance: bool = Field(True, description="c-BTM's balanced assignment (equal-sized clusters)")
    seed: int = Field(0, ge=0, description="random seed of the sample and of k-means")
    validation_fraction: float = Field(
        0.02, ge=0.0, lt=0.5, description="each cluster's share kept as its branch's validation"
    )
    parallelism: int = Field(4, ge=1, le=256, description="workers of the assignment Job")
    branch_template: BranchTemplate = Field(default_factory=BranchTemplate)

    @model_validator(mode="after")
    def _rules(self) -> ElmClusterSetSpec:
        rules.enforce(self, rules.SAMPLE_COVERS_CLUSTERS)
        return self


ClusterSetPhase = Literal["Pending", "Fitting", "Assigning", "Branching", "Ready", "Failed"]


class ElmClusterSetStatus(StatusModel):
    phase: ClusterSetPhase = "Pending"
    message: str = ""
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    version: int | None = None  # a change of clusters, data or features starts a new one
    spec_hash: str | None = None
    storage_name: str | None = None  # clusters/<storageName>/ holds this version's files
    clusterer_sha256: str | None = None
    documents: int | None = None  # documents assigned, over all clusters
    cluster_sizes: list[int] = Field(default_factory=list)  # documents per cluster, in order
    branches: list[str] = Field(default_factory=list)  # the generated ElmBranch names

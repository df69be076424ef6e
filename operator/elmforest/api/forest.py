"""``ElmForest``: the shared architecture, tokenizer, seed, storage and trainer of a forest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator
from pydantic.config import JsonDict

from elmcore.config import ModelConfig, TrainingConfig
from elmcore.errors import BadInputError
from elmcore.uris import StorageURI
from elmforest.api import rules
from elmforest.api.base import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    LOCATION,
    Condition,
    Quantity,
    SpecModel,
    StatusModel,
    partial_model,
)
from elmforest.api.rules import validations

IMMUTABLE: JsonDict = validations(rules.IMMUTABLE)
# What StorageURI.parse accepts, as a pattern the API server can check: s3://bucket/segments
# (letters, digits, _.=+- and never '.' or '..' alone) or file:///path without '.'/'..'
# segments, percent-escapes, '?' or '#'. Every match parses (BUCKET_WITHOUT_DOUBLE_DOTS adds
# the one check a pattern cannot make), so local mode and the cluster accept the same URIs.
_S3_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*"
_FILE_CHAR = r"[^/?#%\x00-\x1f\x7f]"
_FILE_FIRST = r"[^/.?#%\x00-\x1f\x7f]"
_FILE_SEGMENT = rf"({_FILE_FIRST}{_FILE_CHAR}*|\.{_FILE_FIRST}{_FILE_CHAR}*|\.\.{_FILE_CHAR}+)"
STORAGE_URI = (
    rf"^(s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](/+{_S3_SEGMENT}(/{_S3_SEGMENT})*)?/*"
    rf"|file://(localhost)?/+({_FILE_SEGMENT}(/+{_FILE_SEGMENT})*/*)?)$"
)
# A text location: checked by pydantic (local mode) and, through the schema, by the API server.
Location = Annotated[str, StringConstraints(max_length=1024, pattern=LOCATION)]
Locations = list[Location]

if TYPE_CHECKING:
    TrainingSpec = SpecModel
    ModelSpec = SpecModel
else:
    TrainingSpec = partial_model(
        TrainingConfig, "TrainingSpec", "Training hyperparameters; unset fields use defaults."
    )
    ModelSpec = partial_model(
        ModelConfig,
        "ModelSpec",
        "The architecture every ELM shares; unset fields use the trainer's defaults.",
        extra={
            "pretrained": (
                str | None,
                Field(
                    None,
                    max_length=1024,
                    pattern=LOCATION,
                    description="HF-format model folder to start the seed from (instead of sizes)",
                ),
            )
        },
    )


def _location_list(
    description: str = "text locations: s3://bucket/key or file:///path",
) -> object:
    return Field(
        default_factory=list,
        max_length=64,
        description=description,
    )


class StorageSpec(SpecModel):
    """Where everything the forest owns lives (tokenizer, seed, experts, runs, manifest)."""

    model_config = SpecModel.model_config | {
        "json_schema_extra": validations(rules.BUCKET_WITHOUT_DOUBLE_DOTS)
    }

    uri: str = Field(
        max_length=900,  # below StorageURI's key limit, so a long prefix fails here, not later
        pattern=STORAGE_URI,
        description="s3://bucket/prefix (or file:///path in local mode)",
        json_schema_extra=IMMUTABLE,
    )
    endpoint: str | None = Field(
        None,
        max_length=512,
        pattern=r"^https?://[^\s]+$",
        description="S3-compatible endpoint (MinIO, Ceph, R2); unset for AWS",
    )
    region: str | None = Field(None, max_length=64, pattern=r"^[a-z0-9-]+$")
    credentials_secret: str | None = Field(
        None,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description=(
            "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN optional);"
            " unset: the pod's own identity (IRSA / EKS pod identity)"
        ),
    )

    @field_validator("uri")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            StorageURI.parse(value)
        except BadInputError as error:
            raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _rules(self) -> StorageSpec:
        rules.enforce(self, rules.BUCKET_WITHOUT_DOUBLE_DOTS)
        return self


class TokenizerSpec(SpecModel):
    """One tokenizer per forest: ensembling and averaging need it."""

    from_: str | None = Field(
        None,
        alias="from",
        max_length=1024,
        pattern=LOCATION,
        description="an existing HF tokenizer folder; unset: train a byte-level BPE",
    )
    vocab_size: int = Field(8192, ge=256, le=262144, description="BPE vocabulary size")
    data: Locations = _location_list()  # type: ignore[assignment]


class SeedSpec(SpecModel):
    """The seed LM every ELM descends from."""

    data: Locations = _location_list()  # type: ignore[assignment]
    val_data: Locations = _location_list()  # type: ignore[assignment]
    training: TrainingSpec | None = None


class Toleration(SpecModel):
    key: str | None = Field(None, max_length=317)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class Resources(SpecModel):
    """Container resources beside GPUs (``cpu``, ``memory``, ``ephemeral-storage``)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)


class TrainerSpec(SpecModel):
    """How trainer Jobs run: the image and where their pods may go."""

    image: str | None = Field(
        None,
        max_length=512,
        pattern=r"^[^@\s]+@sha256:[0-9a-f]{64}$",
        description="trainer image pinned by digest (repo@sha256:...); required on a cluster",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    gpus: int = Field(
        0, ge=0, le=64, description="nvidia.com/gpu per pod; >1 runs elmtrain-torchrun"
    )
    nodes: int = Field(
        1,
        ge=1,
        le=256,
        description="pods per branch Job (above 1: an Indexed Job of that many pods, one per "
        "node, each with `gpus` GPUs, rendezvousing at index 0 through a headless Service)",
    )
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    queue_name: str | None = Field(
        None, max_length=63, pattern=DNS1123_LABEL, description="Kueue LocalQueue name"
    )
    service_account_name: str | None = Field(None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    backoff_limit: int = Field(
        3, ge=0, le=100, description="pod failures per Job (preemption does not count)"
    )
    active_deadline_seconds: int | None = Field(None, ge=60, description="wall-clock limit")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="keep finished Jobs this long")


class PrepareSpec(SpecModel):
    """The prepare step: a CPU-only Job (the trainer image, no GPUs) that tokenizes a branch's
    or the seed's text into token shards before its training Job, skipped when the shards
    exist; the training Job then reads them."""

    enabled: bool = Field(True, description="false: the training Job tokenizes the text itself")
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    queue_name: str | None = Field(
        None, max_length=63, pattern=DNS1123_LABEL, description="Kueue LocalQueue name"
    )
    backoff_limit: int = Field(3, ge=0, le=100, description="pod failures per prepare Job")
    parallelism: int = Field(
        1,
        ge=1,
        le=1000,
        description="pods that share the text, split by file (above 1: an Indexed Job whose "
        "last pod to finish records the dataset, exactly as one pod would)",
    )


class SelectorRequirement(SpecModel):
    key: str = Field(max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=list, max_length=64
    )


class LabelSelector(SpecModel):
    """Kubernetes' label selector; empty selects everything."""

    match_labels: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, max_length=32
    )
    match_expressions: list[SelectorRequirement] = Field(default_factory=list, max_length=16)


class IngressPeer(SpecModel):
    """Who may connect to the servers: pods of the namespaces ``namespaceSelector`` selects
    (with ``podSelector``: only those pods), or the pods ``podSelector`` selects in the forest's
    own namespace (a NetworkPolicy peer)."""

    model_config = SpecModel.model_config | {
        "json_schema_extra": validations(rules.PEER_HAS_SELECTOR)
    }

    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None

    @model_validator(mode="after")
    def _rules(self) -> IngressPeer:
        rules.enforce(self, rules.PEER_HAS_SELECTOR)
        return self


class ServingSpec(SpecModel):
    """An OpenAI-compatible endpoint for the forest (``elmtrain serve``): a Deployment and a
    Service owned by the forest, from the trainer image, following the manifest as experts
    merge."""

    replicas: int = Field(1, ge=0, le=64, description="server pods")
    top_k: int = Field(2, ge=1, le=64, description="experts that generate for each request")
    routing: Literal["posterior", "clusters"] = Field(
        "posterior",
        description="how experts are chosen and weighted for a prompt: the posterior (BTM), or "
        "the prompt's distance to the clusters of an ElmClusterSet (c-BTM); requests may ask "
        "for the other",
    )
    port: int = Field(8000, ge=1024, le=65535, description="the servers' and the Service's port")
    poll_seconds: int = Field(10, ge=1, le=3600, description="seconds between manifest checks")
    max_batch: int = Field(64, ge=1, le=4096, description="sequences decoding at once per pod")
    gpus: int = Field(0, ge=0, le=8, description="nvidia.com/gpu per server pod")
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    api_key_secret: str | None = Field(
        None,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="a Secret in the forest's namespace whose key `api-keys` holds the "
        "endpoint's API keys, one per line; unset: no authentication",
    )
    allow_from: list[IngressPeer] = Field(
        default_factory=list,
        max_length=32,
        description="who may connect (a NetworkPolicy's ingress peers); empty: the pods of the "
        "forest's namespace only",
    )
    credentials_secret: str | None = Field(
        None,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="the servers' storage credentials (keys as spec.storage.credentialsSecret), "
        "e.g. ones that can read the forest and write only serving/ and priors/; unset: "
        "spec.storage.credentialsSecret",
    )
    exclude_experts: list[
        Annotated[str, StringConstraints(max_length=63, pattern=DNS1123_LABEL)]
    ] = Field(
        default_factory=list,
        max_length=256,
        description="domains whose experts this endpoint never loads or serves (their data "
        "owners opted out); requests may exclude more (elmforest.experts)",
    )


class MergePolicy(SpecModel):
    """When a trained ELM joins the forest. Both unset: always (automatic)."""

    max_val_perplexity: float | None = Field(
        None, gt=0, description="merge only if validation perplexity is at most this"
    )
    require_improvement: bool = Field(
        False, description="merge only if training lowered the domain's validation perplexity"
    )


class EvaluationSpec(SpecModel):
    """An extra column of the forest's report, e.g. a domain no branch trains on."""

    domain: str = Field(max_length=63, pattern=DNS1123_LABEL, description="the column's name")
    data: Locations = Field(
        min_length=1,
        max_length=64,
        description="evaluation text",
    )
    prior_data: Locations = _location_list(  # type: ignore[assignment]
        "held-out text of the domain for its cached prior; unset: a uniform prior"
    )


class MixSpec(SpecModel):
    """Branch-Train-MiX (docs/btx.md): once every branch is merged, one Job mixes the experts
    into one Mixtral mixture-of-experts model and finetunes it; the forest records it in the
    manifest and serves it as ``<forest>/moe``. Llama-family forests only."""

    enabled: bool = Field(False, description="make (and remake, as the experts change) the mix")
    top_k: int = Field(2, ge=1, le=64, description="experts run per token (at most the experts)")
    steps: int = Field(100, ge=0, le=10_000_000, description="finetuning steps (0: none)")
    router_only: bool = Field(False, description="finetune the routers only; all else frozen")
    router: Literal["random", "centroids"] = Field(
        "random", description="router init: random (BTX), or each expert's mean hidden state"
    )
    average: Literal["uniform", "posterior"] = Field(
        "uniform", description="weights of the averaged attention, embedding and norm tensors"
    )
    data: Locations = _location_list(  # type: ignore[assignment]
        "finetuning text; empty: the mixed experts' own training text"
    )
    val_data: Locations = _location_list(  # type: ignore[assignment]
        "validation text; empty: the mixed experts' own validation text"
    )


class ElmForestSpec(SpecModel):
    storage: StorageSpec
    model: ModelSpec = Field(
        default_factory=ModelSpec,
        json_schema_extra=IMMUTABLE,
    )
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, json_schema_extra=IMMUTABLE)
    seed: SeedSpec = Field(default_factory=SeedSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    branch_defaults: TrainingSpec | None = Field(
        None, description="training hyperparameters every branch inherits"
    )
    max_concurrent_branches: int = Field(4, ge=1, le=1024, description="branch Jobs at once")
    merge_policy: MergePolicy = Field(default_factory=MergePolicy)
    evaluation: list[EvaluationSpec] = Field(
        default_factory=list,
        max_length=64,
        description="report columns beside the branches' own domains (out-of-domain text)",
    )
    prepare: PrepareSpec = Field(
        default_factory=PrepareSpec, description="the CPU Jobs that tokenize text into shards"
    )
    serving: ServingSpec | None = Field(
        None, description="serve the forest (OpenAI completions API); unset: not served"
    )
    mix: MixSpec = Field(
        default_factory=MixSpec,
        description="the experts as one finetuned mixture-of-experts model (BTX)",
    )


# ---- status -------------------------------------------------------------------------------

ForestPhase = Literal["Pending", "Tokenizing", "Preparing", "Seeding", "Ready", "Failed"]


class ArtifactStatus(StatusModel):
    uri: str
    sha256: str


class ParentStatus(StatusModel):
    kind: Literal["seed", "expert"]
    domain: str | None = None
    version: int | None = None
    weight: float


class LineageStatus(StatusModel):
    """What made the expert, in brief (the manifest entry lists every file)."""

    data_sha256: str  # one digest of the content of every training file read
    data_files: int
    data_bytes: int
    tokenizer_sha256: str | None = None
    seed_sha256: str | None = None
    image: str | None = None
    elmtrain_version: str


class ExpertStatus(StatusModel):
    domain: str
    branch: str | None = None
    version: int
    uri: str
    sha256: str
    init_strategy: str | None = None
    parents: list[ParentStatus] = Field(default_factory=list)
    val_perplexity_before: float | None = None
    val_perplexity_after: float | None = None
    lineage: LineageStatus | None = None


class ManifestStatus(StatusModel):
    uri: str
    revision: int


class ServingStatus(StatusModel):
    endpoint: str  # the Service's OpenAI base URL
    model: str  # the ensemble's model name
    revision: int | None = None  # the manifest revision the reporting replicas serve (oldest)
    replicas: int = 0  # server pods ready (the Deployment's status)
    message: str = ""


MixPhase = Literal["Waiting", "Mixing", "Ready", "Failed"]


class MixStatus(StatusModel):
    """The forest's mix: the one recorded in the manifest (``uri`` onward), and whether a newer
    one is being made (``phase``, ``message``)."""

    phase: MixPhase = "Waiting"
    message: str = ""
    revision: int | None = None  # the recorded mix's number (moe/v<revision>-...)
    uri: str | None = None
    sha256: str | None = None
    experts: dict[str, int] = Field(default_factory=dict)  # domain -> version mixed
    weights: dict[str, float] = Field(default_factory=dict)  # of the averaged tensors
    top_k: int | None = None
    router: str | None = None
    router_only: bool | None = None
    finetune_steps: int | None = None
    val_perplexity_before: float | None = None
    val_perplexity_after: float | None = None
    data_sha256: str | None = None


class ElmForestStatus(StatusModel):
    phase: ForestPhase = "Pending"
    message: str = ""
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    manifest: ManifestStatus | None = None
    tokenizer: ArtifactStatus | None = None
    seed: ArtifactStatus | None = None
    experts: list[ExpertStatus] = Field(default_factory=list)
    expert_count: int = 0
    serving: ServingStatus | None = None
    mix: MixStatus | None = None

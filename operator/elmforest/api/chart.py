"""The Helm chart's values, typed: ``values.schema.json`` is generated from these models.

The operator reads the same ``trainer`` and ``storage`` models back from its environment (the
chart passes them as JSON), so a default set at install time means one thing everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from elmforest.api.base import DNS1123_LABEL, DNS1123_SUBDOMAIN, SpecModel, partial_model
from elmforest.api.forest import Resources, StorageSpec, Toleration, TrainerSpec

if TYPE_CHECKING:
    TrainerDefaults = SpecModel
    StorageDefaults = SpecModel
else:
    TrainerDefaults = partial_model(
        TrainerSpec,
        "TrainerDefaults",
        "Defaults for every forest's spec.trainer (a forest's own settings win).",
    )
    StorageDefaults = partial_model(
        StorageSpec,
        "StorageDefaults",
        "Defaults for every forest's spec.storage on S3 (a forest's own settings win).",
        exclude=frozenset({"uri"}),
    )

DIGEST = r"^(sha256:[0-9a-f]{64})?$"
Labels = dict[str, str]


class ImageValues(SpecModel):
    """The operator's image, referenced by digest only (a tag can move; a digest cannot)."""

    repository: str = Field(
        "ghcr.io/elmforest/operator", max_length=255, pattern=r"^[a-z0-9][^@\s]*$"
    )
    digest: str = Field(
        "", pattern=DIGEST, description="sha256:<64 hex> of the pushed image; required to install"
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class ServiceAccountValues(SpecModel):
    create: bool = True
    name: str = Field(
        "",
        max_length=253,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$",
        description="'': the release name",
    )
    annotations: Labels = Field(
        default_factory=dict,
        description="e.g. eks.amazonaws.com/role-arn, for the operator's own S3 access (IRSA)",
    )


class ServiceMonitorValues(SpecModel):
    enabled: bool = Field(False, description="needs the Prometheus Operator's CRDs")
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$")
    labels: Labels = Field(default_factory=dict, description="for the Prometheus selector")


class MetricsValues(SpecModel):
    enabled: bool = True
    port: int = Field(9090, ge=1024, le=65535)
    service_monitor: ServiceMonitorValues = Field(default_factory=ServiceMonitorValues)


class OperatorResources(Resources):
    """Requests and limits of the operator's container."""


class EgressRule(SpecModel):
    """Where the operator may connect: CIDR blocks and TCP ports."""

    cidrs: list[str] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"items": {"type": "string", "pattern": r"^[0-9a-fA-F.:]+/[0-9]+$"}},
    )
    ports: list[int] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 65535}},
    )


class NetworkPolicyValues(SpecModel):
    """A NetworkPolicy for the operator's pod: ingress only to its health and metrics ports,
    egress only to DNS, the API server and storage (the addresses are the installer's)."""

    enabled: bool = False
    api_server: EgressRule = Field(
        default_factory=lambda: EgressRule(ports=[443, 6443]),
        description="the API server's addresses (kubectl get endpoints kubernetes -n default)",
    )
    storage: EgressRule = Field(
        default_factory=lambda: EgressRule(ports=[443]),
        description="S3 or MinIO: the forests' storage endpoints' addresses",
    )
    dns: bool = Field(True, description="allow DNS (port 53) to any address")


class PolicyValues(SpecModel):
    """What a forest may name on a shared cluster. Each list empty: anything (the default). A
    forest outside them is refused (Ready=False, reason Forbidden) before anything runs, and
    the operator does not touch its storage."""

    trainer_image_repositories: list[str] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": 255}},
        description="allowed trainer image prefixes (e.g. registry.example.com/ml/); digests "
        "are still required",
    )
    storage_endpoints: list[str] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "string", "maxLength": 512}},
        description="allowed S3 endpoints, exactly; '' allows forests that name none (AWS)",
    )
    buckets: list[str] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": 63}},
        description="allowed bucket names, shell patterns (team-a-*); set: s3:// storage only",
    )
    service_accounts: list[str] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": 253}},
        description="allowed trainer ServiceAccounts (a forest naming none runs as 'default')",
    )
    operator_storage_identity: bool | None = Field(
        None,
        description="may a forest without credentialsSecret use the operator's own storage "
        "identity? null: yes when watchNamespaces is set, no cluster-wide",
    )


class LeaderElectionValues(SpecModel):
    """A coordination.k8s.io Lease that only its holder acts under (operator/leadership.py):
    the standby takes over within leaseDurationSeconds + retryPeriodSeconds of a crash, at
    once after a graceful stop."""

    enabled: bool = Field(True, description="required when replicas > 1")
    lease_duration_seconds: int = Field(15, ge=2, le=300)
    renew_deadline_seconds: int = Field(10, ge=1, le=299, description="< leaseDurationSeconds")
    retry_period_seconds: int = Field(2, ge=1, le=60, description="< renewDeadlineSeconds")


class ChartValues(SpecModel):
    """Every value of ``helm/elmforest`` (camelCase in YAML)."""

    image: ImageValues = Field(default_factory=ImageValues)
    watch_namespaces: list[str] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63}},
        description="namespaces to watch, each with a Role; empty: all, with a ClusterRole",
    )
    replicas: int = Field(
        2, ge=1, le=5, description="operator pods; one leads, the others wait as standbys"
    )
    leader_election: LeaderElectionValues = Field(default_factory=LeaderElectionValues)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    resync_seconds: float = Field(15.0, gt=0, le=3600, description="re-check interval")
    health_port: int = Field(8080, ge=1024, le=65535, description="Kopf's liveness endpoint")
    resources: OperatorResources = Field(
        default_factory=lambda: OperatorResources(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "512Mi"}
        )
    )
    node_selector: Labels = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: dict[str, Any] = Field(default_factory=dict, description="a core/v1 Affinity")
    priority_class_name: str = Field("", max_length=253, pattern=rf"^$|{DNS1123_SUBDOMAIN}")
    pod_annotations: Labels = Field(default_factory=dict)
    pod_labels: Labels = Field(default_factory=dict)
    service_account: ServiceAccountValues = Field(default_factory=ServiceAccountValues)
    metrics: MetricsValues = Field(default_factory=MetricsValues)
    trainer: TrainerDefaults = Field(
        default_factory=TrainerDefaults,
        description="defaults for the forests' spec.trainer: image by digest, GPUs, placement",
    )
    storage: StorageDefaults = Field(
        default_factory=StorageDefaults,
        description="defaults for the forests' spec.storage: S3 endpoint, region, Secret",
    )
    network_policy: NetworkPolicyValues = Field(default_factory=NetworkPolicyValues)
    policy: PolicyValues = Field(
        default_factory=PolicyValues,
        description="guardrails: what a forest may name (images, storage, ServiceAccounts)",
    )

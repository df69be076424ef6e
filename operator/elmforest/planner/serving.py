"""The forest's servers (``spec.serving``), built purely: a Deployment of ``elmtrain serve`` from
the trainer image, a Service in front of it, a NetworkPolicy that lets in only ``allowFrom`` (the
forest's namespace by default) and, with more than one replica, a PodDisruptionBudget, all owned
by the forest; and what the forest's status says of them.

Each object carries the hash of its desired state; the planner applies one only when what the
watch shows differs (or is missing), so a steady forest writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from elmcore.records import ServingRecord
from elmforest.api.forest import ElmForestSpec, ServingSpec, ServingStatus
from elmforest.planner.actions import Action, ApplyObject, DeleteObject
from elmforest.planner.jobs import (
    Owner,
    container_resources,
    container_security_context,
    pod_security_context,
    scheduling,
    scratch_volumes,
    storage_env,
)
from elmforest.planner.naming import (
    LABEL_FOREST,
    LABEL_ROLE,
    MANAGED_BY,
    OPERATOR,
    child_name,
    digest,
)
from elmforest.planner.observed import SPEC_HASH, OwnedObject

ROLE = "serve"
CONTAINER = "server"
KINDS = ("Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget")
# What a server asks of the scheduler when the spec does not say (a floor, not a size).
DEFAULT_REQUESTS = {"cpu": "1", "memory": "2Gi"}
# Where ``spec.serving.apiKeySecret``'s key ``api-keys`` is mounted (``--api-key-file``).
API_KEYS_DIR = "/etc/elmforest/api-keys"
API_KEYS_KEY = "api-keys"
# A replica's record older than this is a pod that is gone (it rewrites it every minute).
STALE_AFTER = timedelta(minutes=3)


def serving_name(forest: str) -> str:
    """A name both kinds accept: a Service's is a DNS-1035 label (no dots, a letter first)."""
    base = re.sub(r"[^a-z0-9-]", "-", forest)
    return child_name(base if base[:1].isalpha() else f"ef-{base}", ROLE)


def _labels(forest: str) -> dict[str, str]:
    return {LABEL_FOREST: forest, LABEL_ROLE: ROLE}


def _argv(forest: str, spec: ElmForestSpec, serving: ServingSpec) -> list[str]:
    return [
        "serve",
        "--forest",
        spec.storage.uri,
        "--port",
        str(serving.port),
        "--name",
        forest,
        "--top-k",
        str(serving.top_k),
        "--max-batch",
        str(serving.max_batch),
        "--poll-seconds",
        str(serving.poll_seconds),
        *(["--api-key-file", f"{API_KEYS_DIR}/{API_KEYS_KEY}"] if serving.api_key_secret else []),
        *(["--exclude-experts", *serving.exclude_experts] if serving.exclude_experts else []),
        # Only when asked: a forest that leaves it unset keeps its servers' exact arguments.
        *(["--routing", serving.routing] if serving.routing != "posterior" else []),
    ]


def deployment(forest: str, namespace: str, owner: Owner, spec: ElmForestSpec) -> dict[str, Any]:
    serving = spec.serving or ServingSpec()
    volumes, mounts = scratch_volumes()
    if serving.api_key_secret:
        # Readable by the pod's group (fsGroup, the server's uid) only, never by others; the
        # pod does not start without the Secret.
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": serving.api_key_secret,
                    "items": [{"key": API_KEYS_KEY, "path": API_KEYS_KEY}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
    env = [
        *storage_env(spec.storage, serving.credentials_secret),
        # The replica's name for its record in storage (serving/<pod>.json).
        {"name": "ELMTRAIN_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    container = {
        "name": CONTAINER,
        "image": spec.trainer.image,
        "imagePullPolicy": spec.trainer.image_pull_policy,
        "command": ["elmtrain"],
        "args": _argv(forest, spec, serving),
        "env": env,
        "ports": [{"name": "http", "containerPort": serving.port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/healthz", "port": "http"}},
        "resources": container_resources(
            serving.resources.model_copy(
                update={"requests": DEFAULT_REQUESTS | serving.resources.requests}
            ),
            serving.gpus,
        ),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
        **scheduling(
            spec.trainer.service_account_name,
            serving.priority_class_name,
            serving.node_selector,
            serving.tolerations,
        ),
    }
    labels = _object_labels(forest)
    return _owned(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": serving_name(forest), "namespace": namespace, "labels": labels},
            "spec": {
                "replicas": serving.replicas,
                "selector": {"matchLabels": _labels(forest)},
                # A new pod is ready before an old one goes: the endpoint never goes dark.
                "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        },
        owner,
    )


def service(forest: str, namespace: str, owner: Owner, spec: ElmForestSpec) -> dict[str, Any]:
    serving = spec.serving or ServingSpec()
    labels = _object_labels(forest)
    return _owned(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": serving_name(forest), "namespace": namespace, "labels": labels},
            "spec": {
                "selector": _labels(forest),
                "ports": [
                    {"name": "http", "port": serving.port, "targetPort": "http", "protocol": "TCP"}
                ],
            },
        },
        owner,
    )


def network_policy(
    forest: str, namespace: str, owner: Owner, spec: ElmForestSpec
) -> dict[str, Any]:
    """Ingress to the servers' port from ``allowFrom`` only; by default from the pods of the
    forest's namespace. (Kubelet probes are the node's own traffic, which network plugins let
    through.)"""
    serving = spec.serving or ServingSpec()
    peers = [
        peer.model_dump(by_alias=True, exclude_none=True, mode="json")
        for peer in serving.allow_from
    ] or [{"podSelector": {}}]
    return _owned(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {
                "name": serving_name(forest),
                "namespace": namespace,
                "labels": _object_labels(forest),
            },
            "spec": {
                "podSelector": {"matchLabels": _labels(forest)},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": peers, "ports": [{"port": serving.port, "protocol": "TCP"}]}],
            },
        },
        owner,
    )


def disruption_budget(
    forest: str, namespace: str, owner: Owner, spec: ElmForestSpec
) -> dict[str, Any]:
    """A voluntary eviction (a node drain) takes one server at a time."""
    return _owned(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {
                "name": serving_name(forest),
                "namespace": namespace,
                "labels": _object_labels(forest),
            },
            "spec": {"selector": {"matchLabels": _labels(forest)}, "maxUnavailable": 1},
        },
        owner,
    )


def _object_labels(forest: str) -> dict[str, str]:
    return {MANAGED_BY: OPERATOR, "app.kubernetes.io/name": "elmforest-serve", **_labels(forest)}


def _owned(body: dict[str, Any], owner: Owner) -> dict[str, Any]:
    body["metadata"]["annotations"] = {SPEC_HASH: digest(body, 16)}
    body["metadata"]["ownerReferences"] = [owner.reference()]
    return body


def serving_actions(
    forest: str,
    namespace: str,
    owner: Owner,
    spec: ElmForestSpec,
    observed: Mapping[str, OwnedObject],
) -> list[Action]:
    """Apply what is missing or changed; delete what ``spec.serving`` no longer asks for."""
    wanted: list[dict[str, Any]] = []
    if spec.serving is not None:
        wanted = [
            deployment(forest, namespace, owner, spec),
            service(forest, namespace, owner, spec),
            network_policy(forest, namespace, owner, spec),
        ]
        if spec.serving.replicas > 1:
            wanted.append(disruption_budget(forest, namespace, owner, spec))
    actions: list[Action] = []
    for body in wanted:
        seen = observed.get(body["kind"])
        if seen is None or seen.spec_hash != body["metadata"]["annotations"][SPEC_HASH]:
            actions.append(ApplyObject(body))
    kinds = {body["kind"] for body in wanted}
    actions += [
        DeleteObject(k, observed[k].name) for k in KINDS if k in observed and k not in kinds
    ]
    return actions


def serving_status(
    forest: str,
    namespace: str,
    spec: ElmForestSpec,
    observed: Mapping[str, OwnedObject],
    records: Iterable[ServingRecord],
    now: datetime | None = None,
) -> ServingStatus | None:
    if spec.serving is None:
        return None
    now = now or datetime.now(UTC)
    live: list[ServingRecord] = []
    unreadable: list[str] = []  # a record the operator cannot read is reported and skipped
    for record in records:
        updated = _updated_at(record)
        if updated is None:
            when = record.updated_at[:40]
            unreadable.append(f"serving/{record.replica}.json: updated_at {when!r} is not an "
                              "ISO 8601 time with a zone (skipped)")  # fmt: skip
        elif now - updated < STALE_AFTER:
            live.append(record)
    served = [r.revision for r in live if r.revision is not None]
    ready = observed["Deployment"].ready_replicas if "Deployment" in observed else 0
    waiting = [r.message for r in live if r.message] + unreadable
    return ServingStatus(
        endpoint=f"http://{serving_name(forest)}.{namespace}.svc:{spec.serving.port}/v1",
        model=forest,
        revision=min(served) if served else None,
        replicas=ready,
        message=waiting[0] if waiting else "",
    )


def _updated_at(record: ServingRecord) -> datetime | None:
    """When the replica wrote its record; None if that cannot be read (a foreign writer)."""
    try:
        updated = datetime.fromisoformat(record.updated_at)
    except (TypeError, ValueError):
        return None
    return updated if updated.tzinfo is not None else None

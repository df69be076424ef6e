"""The Kubernetes calls the operator makes, and nothing else (RBAC lists exactly these).

Blocking (the ``kubernetes`` client); the reconcilers call it from worker threads. Errors are
split the Kopf way: temporary ones are retried, permanent ones end in a condition.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from elmcore.storage import S3Credentials
from elmforest.adapters.errors import SecretInvalidError, SecretNotFoundError
from elmforest.api import BRANCH, GROUP, VERSION, Kind

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply (JSON is YAML)
FIELD_MANAGER = "elmforest"


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verbs: tuple[str, ...]


# Every call below, and Kopf's own (list/watch of the two kinds and Jobs, patches of the
# kinds' finalizers and annotations, status patches, core Events), as RBAC rules: the Helm
# chart's Role is generated from this list, and the end-to-end tests record every request
# the operator makes and check it against this list.
PERMISSIONS = (
    Permission(GROUP, "elmforests", ("list", "watch", "patch")),
    Permission(GROUP, "elmforests/status", ("patch",)),
    # Branches are also created (applied server-side) and deleted by their ElmClusterSet.
    Permission(GROUP, "elmbranches", ("list", "watch", "create", "patch", "delete")),
    Permission(GROUP, "elmbranches/status", ("patch",)),
    Permission(GROUP, "elmclustersets", ("list", "watch", "patch")),  # Kopf's finalizer (daemons)
    Permission(GROUP, "elmclustersets/status", ("patch",)),
    Permission("batch", "jobs", ("list", "watch", "create", "delete", "deletecollection")),
    # The forest's servers (spec.serving): applied server-side (which creates them: the API
    # server checks "create" then), deleted when unset.
    Permission("apps", "deployments", ("list", "watch", "create", "patch", "delete")),
    Permission("", "services", ("list", "watch", "create", "patch", "delete")),
    Permission(
        "networking.k8s.io", "networkpolicies", ("list", "watch", "create", "patch", "delete")
    ),
    Permission("policy", "poddisruptionbudgets", ("list", "watch", "create", "patch", "delete")),
    Permission("", "secrets", ("get",)),
    Permission("", "events", ("create",)),
)


def load_config() -> None:
    """In a pod: its service account; elsewhere: KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _raise(error: ApiException, what: str) -> None:
    if error.status in (408, 429) or (error.status or 0) >= 500:
        raise kopf.TemporaryError(f"{what}: HTTP {error.status} {error.reason}", delay=2) from None
    raise error


def _resource_version(response: Any) -> str | None:
    """The resourceVersion in a raw (unparsed) response of a write."""
    body = json.loads(response.data)
    meta = body.get("metadata") if isinstance(body, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return str(version) if version else None


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None, connections: int = 16) -> None:
        if api_client is None:
            # One pooled connection per I/O thread: the default pool (5 per CPU) is smaller
            # than the thread pool, and a full pool opens and drops a connection per call.
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = connections
            api_client = client.ApiClient(configuration)
        self.api = api_client
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.networking = client.NetworkingV1Api(self.api)
        self.policy = client.PolicyV1Api(self.api)

    def create_job(self, body: dict[str, Any]) -> bool:
        """Create the Job; False if it exists already (same deterministic name: a repeat)."""
        meta = body["metadata"]
        try:
            # The created Job comes back through the watch: skip parsing it into models here.
            response = self.batch.create_namespaced_job(
                meta["namespace"], body, _preload_content=False
            )
            # An unread answer keeps its connection out of the pool: the next call would open
            # (and TLS-handshake) a new one. Reading it to the end hands the connection back.
            response.drain_conn()
            response.release_conn()
        except ApiException as error:
            if error.status == 409:
                return False
            _raise(error, f"create Job {meta['name']}")
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as error:
            if error.status != 404:
                _raise(error, f"delete Job {name}")

    def _custom(self, method: Any) -> Any:
        """A custom-object call shaped as the typed ones: (name, namespace, ...)."""

        def call(name: str, namespace: str, *args: Any, **kwargs: Any) -> Any:
            return method(GROUP, VERSION, namespace, BRANCH.plural, name, *args, **kwargs)

        return call

    def _patch(self, kind: str) -> Any:
        return {
            BRANCH.kind: self._custom(self.custom.patch_namespaced_custom_object),
            "Deployment": self.apps.patch_namespaced_deployment,
            "Service": self.core.patch_namespaced_service,
            "NetworkPolicy": self.networking.patch_namespaced_network_policy,
            "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
        }[kind]

    def _delete(self, kind: str) -> Any:
        return {
            BRANCH.kind: self._custom(self.custom.delete_namespaced_custom_object),
            "Deployment": self.apps.delete_namespaced_deployment,
            "Service": self.core.delete_namespaced_service,
            "NetworkPolicy": self.networking.delete_namespaced_network_policy,
            "PodDisruptionBudget": self.policy.delete_namespaced_pod_disruption_budget,
        }[kind]

    def apply(self, body: dict[str, Any]) -> None:
        """Server-side apply of an object the operator owns (planner/serving.py's kinds, an
        ElmClusterSet's branches): creates it, or sets the fields it manages; another
        manager's fields stay."""
        meta = body["metadata"]
        patch = self._patch(body["kind"])
        try:
            response = patch(
                meta["name"],
                meta["namespace"],
                body,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY_PATCH,
                _preload_content=False,
            )
            response.drain_conn()
            response.release_conn()
        except ApiException as error:
            _raise(error, f"apply {body['kind']} {meta['name']}")

    def delete_object(self, kind: str, namespace: str, name: str) -> None:
        delete = self._delete(kind)
        try:
            delete(name, namespace, propagation_policy="Background")
        except ApiException as error:
            if error.status != 404:
                _raise(error, f"delete {kind} {name}")

    def delete_jobs(self, namespace: str, selector: str) -> None:
        try:
            self.batch.delete_collection_namespaced_job(
                namespace, label_selector=selector, propagation_policy="Background"
            )
        except ApiException as error:
            if error.status != 404:
                _raise(error, f"delete Jobs {selector}")

    def patch_status(
        self, kind: Kind, namespace: str, name: str, status: dict[str, Any]
    ) -> str | None:
        """Merge-patch the status; returns the new resourceVersion (None: the object is gone)."""
        # A whole-status merge patch; keys we no longer set are nulled so they disappear.
        patch = self.custom.patch_namespaced_custom_object_status
        return self._merge_patch(patch, kind, namespace, name, {"status": status}, (404,))

    def set_finalizers(
        self, kind: Kind, namespace: str, name: str, resource_version: str, finalizers: list[str]
    ) -> str | None:
        """Replace the object's finalizers if it is still at ``resource_version``; returns the
        new resourceVersion, or None if it changed meanwhile (409) or is gone (404): the caller
        retries from a fresh read."""
        meta = {"finalizers": finalizers, "resourceVersion": resource_version}
        patch = self.custom.patch_namespaced_custom_object
        return self._merge_patch(patch, kind, namespace, name, {"metadata": meta}, (404, 409))

    @staticmethod
    def _merge_patch(
        patch: Any,
        kind: Kind,
        namespace: str,
        name: str,
        body: dict[str, Any],
        tolerated: tuple[int, ...],
    ) -> str | None:
        """One merge patch; the new resourceVersion ("" if the server sent none), or None on a
        ``tolerated`` status. The response is not parsed into models: the watch brings the
        object anyway."""
        try:
            response = patch(
                GROUP,
                VERSION,
                namespace,
                kind.plural,
                name,
                body,
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        except ApiException as error:
            if error.status in tolerated:
                return None
            _raise(error, f"patch {kind.kind} {name} {'/'.join(body)}")
            raise
        return _resource_version(response) or ""

    def read_credentials(self, namespace: str, name: str) -> S3Credentials:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                raise SecretNotFoundError(f"Secret {name!r} not found") from None
            _raise(error, f"read Secret {name}")
            raise
        try:
            data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
            raise SecretInvalidError(
                f"Secret {name!r} holds a value that is not UTF-8 text (bad input: fix the Secret)"
            ) from None
        try:
            return S3Credentials(
                data["AWS_ACCESS_KEY_ID"],
                data["AWS_SECRET_ACCESS_KEY"],
                data.get("AWS_SESSION_TOKEN"),
            )
        except KeyError as missing:
            raise SecretNotFoundError(f"Secret {name!r} has no key {missing}") from None

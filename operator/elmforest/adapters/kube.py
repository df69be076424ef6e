"""The Kubernetes calls the operator makes, and nothing else (RBAC lists exactly these).

Blocking (the ``kubernetes`` client); the reconcilers call it from worker threads. Errors are
split the Kopf way: temporary ones are retried, permanent ones end in a condition.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from elmcore.storage import S3Credentials
from elmforest.api import GROUP, VERSION, Kind

MERGE_PATCH = "application/merge-patch+json"


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
    Permission(GROUP, "elmbranches", ("list", "watch", "patch")),
    Permission(GROUP, "elmbranches/status", ("patch",)),
    Permission("batch", "jobs", ("list", "watch", "create", "delete", "deletecollection")),
    Permission("", "secrets", ("get",)),
    Permission("", "events", ("create",)),
)


class SecretNotFoundError(Exception):
    pass


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


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = api_client or client.ApiClient()
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def create_job(self, body: dict[str, Any]) -> bool:
        """Create the Job; False if it exists already (same deterministic name: a repeat)."""
        meta = body["metadata"]
        try:
            self.batch.create_namespaced_job(meta["namespace"], body)
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

    def delete_jobs(self, namespace: str, selector: str) -> None:
        try:
            self.batch.delete_collection_namespaced_job(
                namespace, label_selector=selector, propagation_policy="Background"
            )
        except ApiException as error:
            if error.status != 404:
                _raise(error, f"delete Jobs {selector}")

    def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> None:
        # A whole-status merge patch; keys we no longer set are nulled so they disappear.
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                kind.plural,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
            )
        except ApiException as error:
            if error.status == 404:
                return  # deleted meanwhile: nothing to report on
            _raise(error, f"patch {kind.kind} {name} status")

    def read_credentials(self, namespace: str, name: str) -> S3Credentials:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                raise SecretNotFoundError(f"Secret {name!r} not found") from None
            _raise(error, f"read Secret {name}")
            raise
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        try:
            return S3Credentials(
                data["AWS_ACCESS_KEY_ID"],
                data["AWS_SECRET_ACCESS_KEY"],
                data.get("AWS_SESSION_TOKEN"),
            )
        except KeyError as missing:
            raise SecretNotFoundError(f"Secret {name!r} has no key {missing}") from None

"""Guardrails for shared clusters (the chart's ``policy`` values): what a forest may name.

A forest's author chooses the trainer image, the ServiceAccount its Jobs run as, the storage
endpoint and bucket; the operator reads the forest's Secret and acts on that storage with its
own identity. On a cluster shared by teams, the installer bounds those choices. Pure: the
values arrive as JSON in the operator's environment; a forest is checked as it will run (after
the chart's defaults).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from elmcore.errors import BadInputError
from elmcore.uris import StorageURI
from elmforest.api.chart import PolicyValues
from elmforest.api.forest import ElmForestSpec

POLICY_ENV = "ELMFOREST_POLICY"
CLUSTER_WIDE_ENV = "ELMFOREST_CLUSTER_WIDE"  # "true": the chart watches every namespace


@dataclass(frozen=True)
class Policy:
    images: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    buckets: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    operator_identity: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Policy:
        text = env.get(POLICY_ENV)
        try:
            values = PolicyValues.model_validate(json.loads(text)) if text else PolicyValues()
        except (ValueError, ValidationError) as error:
            raise BadInputError(f"${POLICY_ENV} is not valid: {error}") from None
        cluster_wide = env.get(CLUSTER_WIDE_ENV, "").lower() == "true"
        identity = values.operator_storage_identity
        return cls(
            tuple(values.trainer_image_repositories),
            tuple(values.storage_endpoints),
            tuple(values.buckets),
            tuple(values.service_accounts),
            (not cluster_wide) if identity is None else identity,
        )

    def problem(self, spec: ElmForestSpec) -> str | None:
        """Why ``spec`` is outside the guardrails, naming the value and the rule; None if not."""
        image = spec.trainer.image
        if self.images and image and not any(image.startswith(p) for p in self.images):
            return _refused("spec.trainer.image", image, "trainerImageRepositories", self.images)
        account = spec.trainer.service_account_name or "default"
        if self.service_accounts and account not in self.service_accounts:
            where = "spec.trainer.serviceAccountName"
            return _refused(where, account, "serviceAccounts", self.service_accounts)
        storage = spec.storage
        endpoint = storage.endpoint or ""
        if self.endpoints and endpoint not in self.endpoints:
            shown = endpoint or "(none: AWS)"
            return _refused("spec.storage.endpoint", shown, "storageEndpoints", self.endpoints)
        uri = StorageURI.parse(storage.uri)
        if self.buckets:
            bucket = uri.bucket if uri.scheme == "s3" else ""
            if not any(fnmatch.fnmatchcase(bucket, pattern) for pattern in self.buckets):
                shown = bucket or storage.uri
                return _refused("spec.storage.uri", shown, "buckets", self.buckets)
        if uri.scheme == "s3" and not storage.credentials_secret and not self.operator_identity:
            return (
                "spec.storage.credentialsSecret is required: this installation does not lend "
                "the operator's own storage identity to forests (policy.operatorStorageIdentity)"
            )
        return None


def _refused(where: str, value: str, rule: str, allowed: tuple[str, ...]) -> str:
    return f"{where} {value!r} is not allowed by policy.{rule} ({', '.join(allowed)})"

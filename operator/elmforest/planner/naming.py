"""Deterministic names and labels of what the operator creates."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from elmforest.api import GROUP

MAX_NAME = 63  # Job names become pod labels (job-name), which are limited to 63 characters

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "elmforest"
LABEL_FOREST = f"{GROUP}/forest"
LABEL_BRANCH = f"{GROUP}/branch"
LABEL_ROLE = f"{GROUP}/role"
LABEL_CLUSTER_SET = f"{GROUP}/cluster-set"  # on the Jobs and branches of an ElmClusterSet
ANNOTATION_RUN = f"{GROUP}/run-id"
FINALIZER = f"{GROUP}/finalizer"  # Kopf's, on forests
BRANCH_FINALIZER = f"{GROUP}/expert"  # the branch worker's own: its expert leaves the forest
# "true" on a deleting branch whose storage cannot be reached: let it go without cleaning up.
RELEASE_ANNOTATION = f"{GROUP}/release"


def digest(value: Any, length: int = 8) -> str:
    """A short stable hash of JSON-able data (spec fingerprints, name suffixes)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(owner: str, suffix: str, limit: int = MAX_NAME) -> str:
    """``<owner>-<suffix>``, shortened with a hash of the whole when it would be too long."""
    name = f"{owner}-{suffix}"
    if len(name) <= limit:
        return name
    tail = f"-{digest(name, 6)}-{suffix}"
    return owner[: limit - len(tail)].rstrip("-") + tail


def branch_job_name(branch: str, version: int, attempt: int) -> str:
    return child_name(branch, f"v{version}-a{attempt}")


def forest_job_name(forest: str, role: str, fingerprint: str) -> str:
    return child_name(forest, f"{role}-{fingerprint[:6]}")

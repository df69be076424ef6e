"""The typed resources: ``ElmForest``, ``ElmBranch`` and ``ElmClusterSet`` (the CRDs are generated
from these)."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "btm.elmforest.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "btm"


@dataclass(frozen=True)
class Kind:
    """How one kind is addressed in the API (for clients, RBAC and the CRD)."""

    kind: str
    plural: str
    singular: str
    short_name: str

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


FOREST = Kind("ElmForest", "elmforests", "elmforest", "ef")
BRANCH = Kind("ElmBranch", "elmbranches", "elmbranch", "eb")
CLUSTER_SET = Kind("ElmClusterSet", "elmclustersets", "elmclusterset", "ecs")

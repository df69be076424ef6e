"""CEL validation rules, each with the Python check that means the same.

The API server evaluates the CEL text (``x-kubernetes-validations`` in the CRDs); local mode has
no API server, so each rule carries a predicate that the model runs in its place. Declaring both
together keeps one set of rules: a table of objects runs through the real API server and local
mode, and they must agree (tests/cluster/test_validation.py); a CRD rule without a counterpart
here fails tests/operator/test_crds.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic.config import JsonDict


@dataclass(frozen=True)
class Rule:
    rule: str  # CEL, as the API server runs it
    message: str
    holds: Callable[[Any], bool]  # the same rule on the validated model
    field_path: str | None = None  # where the server reports a failure (e.g. ".uri")

    def schema(self) -> JsonDict:
        extra: JsonDict = {"fieldPath": self.field_path} if self.field_path else {}
        return {"rule": self.rule, "message": self.message, **extra}


def validations(*rules: Rule) -> JsonDict:
    return {"x-kubernetes-validations": [rule.schema() for rule in rules]}


def enforce(model: Any, *rules: Rule) -> None:
    """Raise the first broken rule's message, as the API server would (for pydantic)."""
    for rule in rules:
        if not rule.holds(model):
            raise ValueError(rule.message)


# A transition rule: the API server compares with the stored object; local mode compares with
# its state file (elmforest.api.immutable reads these from the schema).
IMMUTABLE = Rule("self == oldSelf", "is immutable once set", lambda _: True)

COPY_NEEDS_SOURCE = Rule(
    "self.strategy != 'copy' || has(self.copyFrom)",
    "strategy 'copy' needs copyFrom",
    lambda init: init.strategy != "copy" or init.copy_from is not None,
)

_BUCKET_DOTS = re.compile(r"^s3://[^/]*\.\.")
# An S3 bucket name never holds '..' (the storage URI pattern cannot say so: RE2 has no lookahead).
BUCKET_WITHOUT_DOUBLE_DOTS = Rule(
    "!self.uri.matches('^s3://[^/]*[.][.]')",
    "an S3 bucket name must not contain '..'",
    lambda storage: not _BUCKET_DOTS.search(storage.uri),
    field_path=".uri",
)

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# The API server only asks a DNS-1123 subdomain of a custom resource's name; ours name Jobs and
# storage paths, so they must be labels (no dots).
NAME_IS_LABEL = Rule(
    f"size(self.metadata.name) <= 63 && self.metadata.name.matches('{_LABEL.pattern}')",
    "metadata.name must be a DNS-1123 label: at most 63 characters (it names Jobs and "
    "storage paths)",
    lambda name: len(name) <= 63 and bool(_LABEL.match(name)),
)

ALL = (IMMUTABLE, COPY_NEEDS_SOURCE, BUCKET_WITHOUT_DOUBLE_DOTS, NAME_IS_LABEL)

# A NetworkPolicy peer with neither selector is refused by the API server when the operator
# applies it: refused here, on the forest, instead.
PEER_HAS_SELECTOR = Rule(
    "has(self.namespaceSelector) || has(self.podSelector)",
    "an allowFrom entry needs namespaceSelector, podSelector or both",
    lambda peer: peer.namespace_selector is not None or peer.pod_selector is not None,
)

# c-BTM's cluster sets (issue 30): k-means needs a document per cluster at least, and a tf-idf
# n-gram range must not be empty.
SAMPLE_COVERS_CLUSTERS = Rule(
    "self.sample >= self.clusters",
    "sample must be at least clusters (k-means needs a document per cluster)",
    lambda spec: spec.sample >= spec.clusters,
)
NGRAM_RANGE = Rule(
    "self.ngramMin <= self.ngramMax",
    "ngramMin must not exceed ngramMax",
    lambda features: features.ngram_min <= features.ngram_max,
)

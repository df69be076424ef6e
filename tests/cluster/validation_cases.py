"""One table of objects, each accepted or refused: every validation the CRDs promise.

The same table runs through the real API server (``kubectl apply --server-side
--validate=strict``) and through local mode's loader, and both must agree
(tests/cluster/test_validation.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from elmforest.api import API_VERSION

IMAGE = "registry.example.com/elmforest/trainer@sha256:" + "0" * 64


def forest(name: str = "f1", **spec: Any) -> dict[str, Any]:
    body = {"storage": {"uri": f"s3://bucket/forests/{name}"}, "trainer": {"image": IMAGE}}
    return {
        "apiVersion": API_VERSION,
        "kind": "ElmForest",
        "metadata": {"name": name},
        "spec": {**body, **spec},
    }


def branch(name: str = "b1", **spec: Any) -> dict[str, Any]:
    body = {"forest": "f1", "domain": "code", "data": {"train": ["s3://bucket/code.txt"]}}
    return {
        "apiVersion": API_VERSION,
        "kind": "ElmBranch",
        "metadata": {"name": name},
        "spec": {**body, **spec},
    }


def cluster_set(name: str = "s1", **spec: Any) -> dict[str, Any]:
    body = {"forest": "f1", "data": ["s3://bucket/crawl/"], "clusters": 4, "sample": 1000}
    return {
        "apiVersion": API_VERSION,
        "kind": "ElmClusterSet",
        "metadata": {"name": name},
        "spec": {**body, **spec},
    }


def edited(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``body`` with the dotted ``path`` set to ``value`` (``...``: removed)."""
    out = copy.deepcopy(body)
    node = out
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return out


@dataclass(frozen=True)
class Case:
    id: str
    body: dict[str, Any]
    field: str = ""  # "": accepted; else the field that both must name in their refusal
    server_says: str = ""  # what kubectl prints about it (a fragment)
    before: dict[str, Any] | None = None  # an update: the object as stored first


ACCEPTED = [
    Case("branch", branch()),
    Case("cluster-set", cluster_set()),
    Case(
        "cluster-set-full",
        cluster_set(
            features={"maxFeatures": 1000, "ngramMin": 1, "ngramMax": 2},
            balance=False,
            validationFraction=0.05,
            parallelism=8,
            branchTemplate={"training": {"steps": 10}, "retention": "Delete"},
        ),
    ),
    Case(
        "branch-full",
        branch(
            init={"strategy": "copy", "copyFrom": "legal", "topK": 2},
            training={"steps": 10, "learningRate": 0.001},
            retention="Delete",
            maxAttempts=20,
            suspend=True,
        ),
    ),
    Case("forest", forest()),
    Case("forest-file-storage", forest(storage={"uri": "file:///srv/forests/a.b/c"})),
    Case(
        "forest-quantities",
        forest(
            trainer={
                "image": IMAGE,
                "gpus": 2,
                "resources": {
                    "requests": {"cpu": 4, "memory": "16Gi"},
                    "limits": {"memory": "16Gi"},
                },
            }
        ),
    ),
    Case("forest-number-as-integer", forest(mergePolicy={"maxValPerplexity": 50})),
    Case("forest-model", forest(model={"family": "llama", "dModel": 64, "nLayers": 2})),
    Case("name-longest", edited(branch(), "metadata.name", "b" * 63)),  # 63: a label's limit
]

REFUSED = [
    # cluster sets (c-BTM): k-means needs a document per cluster; an n-gram range is not empty
    Case(
        "cluster-set-sample-below-clusters",
        cluster_set(clusters=8, sample=4),
        "spec",
        "sample must be at least clusters",
    ),
    Case(
        "cluster-set-ngram-range",
        cluster_set(features={"ngramMin": 2, "ngramMax": 1}),
        "spec.features",
        "ngramMin must not exceed ngramMax",
    ),
    Case("cluster-set-no-data", cluster_set(data=[]), "spec.data", "should have at least 1"),
    Case(
        "cluster-set-zero-clusters", cluster_set(clusters=0), "spec.clusters", "should be greater"
    ),
    # names
    Case(
        "name-not-dns", edited(branch(), "metadata.name", "Bad_Name"), "metadata.name", "RFC 1123"
    ),
    Case(
        "name-with-dots",
        edited(branch(), "metadata.name", "a.b"),
        "metadata.name",
        "metadata.name must be a DNS-1123 label",
    ),
    Case(
        "name-too-long",
        edited(branch(), "metadata.name", "b" * 64),
        "metadata.name",
        "metadata.name must be a DNS-1123 label: at most 63 characters",
    ),
    Case("domain-pattern", branch(domain="Not_A_Label"), "spec.domain", "should match"),
    Case("domain-too-long", branch(domain="d" * 64), "spec.domain", "Too long"),
    Case("forest-ref-pattern", branch(forest="Forest!"), "spec.forest", "should match"),
    # data
    Case(
        "train-missing",
        branch(data={"validation": ["s3://b/v.txt"]}),
        "spec.data.train",
        "Required value",
    ),
    Case("train-empty", branch(data={"train": []}), "spec.data.train", "at least 1 items"),
    Case(
        "train-too-many",
        branch(data={"train": [f"s3://b/{i}.txt" for i in range(65)]}),
        "spec.data.train",
        "Too many",
    ),
    Case(
        "location-control-char",
        branch(data={"train": ["s3://b/x\x01.txt"]}),
        "spec.data.train[0]",
        "should match",
    ),
    # init
    Case(
        "init-enum", branch(init={"strategy": "bogus"}), "spec.init.strategy", "Unsupported value"
    ),
    Case(
        "copy-needs-copyfrom",
        branch(init={"strategy": "copy"}),
        "spec.init",
        "strategy 'copy' needs copyFrom",
    ),
    Case(
        "copyfrom-pattern",
        branch(init={"strategy": "copy", "copyFrom": "A B"}),
        "spec.init.copyFrom",
        "should match",
    ),
    Case("topk-minimum", branch(init={"topK": 0}), "spec.init.topK", "greater than or equal to 1"),
    # training and the rest
    Case(
        "steps-minimum",
        branch(training={"steps": -1}),
        "spec.training.steps",
        "greater than or equal to 0",
    ),
    Case(
        "steps-string",
        branch(training={"steps": "10"}),
        "spec.training.steps",
        "must be of type integer",
    ),
    Case(
        "steps-float",
        branch(training={"steps": 2.5}),
        "spec.training.steps",
        "must be of type integer",
    ),
    Case("suspend-string", branch(suspend="yes"), "spec.suspend", "must be of type boolean"),
    Case("retention-enum", branch(retention="Forever"), "spec.retention", "Unsupported value"),
    Case("max-attempts", branch(maxAttempts=21), "spec.maxAttempts", "less than or equal to 20"),
    Case(
        "gpus-maximum",
        branch(trainer={"gpus": 65}),
        "spec.trainer.gpus",
        "less than or equal to 64",
    ),
    Case(
        "unknown-field",
        branch(trainng={"steps": 3}),
        "spec.trainng",
        'unknown field "spec.trainng"',
    ),
    Case(
        "unknown-nested-field",
        branch(init={"stratgy": "seed"}),
        "spec.init.stratgy",
        'unknown field "spec.init.stratgy"',
    ),
    Case(
        "branch-image-override",
        branch(trainer={"image": IMAGE}),
        "spec.trainer.image",
        'unknown field "spec.trainer.image"',
    ),
    # forests
    Case(
        "storage-missing", edited(forest(), "spec.storage", ...), "spec.storage", "Required value"
    ),
    Case(
        "storage-scheme",
        forest(storage={"uri": "http://bucket/x"}),
        "spec.storage.uri",
        "should match",
    ),
    Case(
        "storage-bucket-case",
        forest(storage={"uri": "s3://Bucket/x"}),
        "spec.storage.uri",
        "should match",
    ),
    Case(
        "storage-dotdot",
        forest(storage={"uri": "s3://bucket/a/../b"}),
        "spec.storage.uri",
        "should match",
    ),
    Case(
        "storage-percent",
        forest(storage={"uri": "s3://bucket/a%2Fb"}),
        "spec.storage.uri",
        "should match",
    ),
    Case(
        "storage-query",
        forest(storage={"uri": "s3://bucket/a?b=c"}),
        "spec.storage.uri",
        "should match",
    ),
    Case(
        "storage-bucket-dots",
        forest(storage={"uri": "s3://bu..cket/x"}),
        "spec.storage.uri",
        "must not contain '..'",
    ),
    Case(
        "storage-file-dotdot",
        forest(storage={"uri": "file:///srv/../etc"}),
        "spec.storage.uri",
        "should match",
    ),
    Case(
        "image-not-by-digest",
        forest(trainer={"image": "registry.example.com/t:latest"}),
        "spec.trainer.image",
        "should match",
    ),
    Case(
        "vocab-minimum",
        forest(tokenizer={"vocabSize": 100}),
        "spec.tokenizer.vocabSize",
        "greater than or equal to 256",
    ),
    Case(
        "concurrency-minimum",
        forest(maxConcurrentBranches=0),
        "spec.maxConcurrentBranches",
        "greater than or equal to 1",
    ),
    Case(
        "model-family-enum",
        forest(model={"family": "gpt3"}),
        "spec.model.family",
        "Unsupported value",
    ),
    Case(
        "perplexity-exclusive-minimum",
        forest(mergePolicy={"maxValPerplexity": 0}),
        "spec.mergePolicy.maxValPerplexity",
        "greater than 0",
    ),
    Case(
        "quantity-float",
        forest(trainer={"image": IMAGE, "resources": {"requests": {"cpu": 1.5}}}),
        "spec.trainer.resources.requests.cpu",
        "must be of type",
    ),
    Case(
        "evaluation-needs-data",
        forest(evaluation=[{"domain": "ood"}]),
        "spec.evaluation[0].data",
        "Required value",
    ),
    Case(
        "serving-allow-from",
        forest(
            serving={
                "allowFrom": [
                    {"namespaceSelector": {"matchLabels": {"team": "eval"}}},
                    {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}},
                ],
                "credentialsSecret": "serving-creds",
                "excludeExperts": ["legal"],
            }
        ),
    ),
    Case(
        "serving-peer-needs-a-selector",
        forest(serving={"allowFrom": [{}]}),
        "spec.serving.allowFrom[0]",
        "an allowFrom entry needs",
    ),
    Case(
        "serving-exclude-not-a-domain",
        forest(serving={"excludeExperts": ["Legal"]}),
        "spec.serving.excludeExperts[0]",
        "should match",
    ),
    Case(
        "toleration-enum",
        forest(trainer={"image": IMAGE, "tolerations": [{"effect": "Never"}]}),
        "spec.trainer.tolerations[0].effect",
        "Unsupported value",
    ),
]

UPDATES = [
    Case("cluster-set-k-change", cluster_set(clusters=8), before=cluster_set()),
    Case(
        "cluster-set-forest-immutable",
        cluster_set(forest="f2"),
        "spec.forest",
        "is immutable once set",
        before=cluster_set(),
    ),
    Case(
        "branch-steps-change", branch(training={"steps": 20}), before=branch(training={"steps": 10})
    ),
    Case(
        "branch-domain-immutable",
        branch(domain="legal"),
        "spec.domain",
        "is immutable once set",
        before=branch(),
    ),
    Case(
        "branch-forest-immutable",
        branch(forest="f2"),
        "spec.forest",
        "is immutable once set",
        before=branch(),
    ),
    Case(
        "forest-uri-immutable",
        forest(storage={"uri": "s3://bucket/elsewhere"}),
        "spec.storage.uri",
        "is immutable once set",
        before=forest(),
    ),
    Case(
        "forest-model-immutable",
        forest(model={"dModel": 96}),
        "spec.model",
        "is immutable once set",
        before=forest(model={"dModel": 64}),
    ),
    Case(
        "forest-tokenizer-immutable",
        forest(tokenizer={"vocabSize": 512}),
        "spec.tokenizer",
        "is immutable once set",
        before=forest(tokenizer={"vocabSize": 1024}),
    ),
    Case("forest-seed-change", forest(seed={"data": ["s3://b/more.txt"]}), before=forest()),
]

CASES = ACCEPTED + REFUSED + UPDATES

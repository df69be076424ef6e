"""Fixtures for the operator's integration tests: a cluster, S3 (moto), a forest's YAML."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from elmcore.manifest import Manifest
from tests.harness.cluster import Cluster

IMAGE = "registry.example.com/elmforest/trainer@sha256:" + "0" * 64
DOMAINS = ("cooking", "sailing", "finance", "poetry")
BRANCH_TRAINING = {
    "steps": 20,
    "batchSize": 8,
    "seqLen": 64,
    "checkpointInterval": 10,
    "warmupSteps": 5,
    "evalBatches": 4,
    "progressIntervalSeconds": 0.5,
}


@pytest.fixture
def cluster(tmp_path: Path, s3_endpoint: str) -> Iterator[Cluster]:
    keep = ("PATH", "HOME", "LANG", "ELMTRAIN_CACHE", "AWS_DEFAULT_REGION", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(OMP_NUM_THREADS="1", ELMFOREST_S3_MAX_ATTEMPTS="3")
    running = Cluster(tmp_path, env).start()
    running.secret("s3-creds", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def s3_data(s3_endpoint: str, s3_bucket: str, corpus: Path) -> str:
    """The corpus uploaded to S3; returns the bucket's URI."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for domain in DOMAINS:
        for split in ("train", "valid"):
            client.upload_file(
                str(corpus / domain / f"{split}.txt"), s3_bucket, f"data/{domain}/{split}.txt"
            )
    return f"s3://{s3_bucket}"


def forest_body(name: str, bucket: str, endpoint: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmForest",
        "metadata": {"name": name},
        "spec": {
            "storage": {
                "uri": f"{bucket}/forests/{name}",
                "endpoint": endpoint,
                "region": "us-east-1",
                "credentialsSecret": "s3-creds",
            },
            "model": {"dModel": 48, "nLayers": 2, "nHeads": 2, "contextLength": 64},
            "tokenizer": {"vocabSize": 320},
            "seed": {
                "data": [f"{bucket}/data/{d}/train.txt" for d in DOMAINS],
                "training": {**BRANCH_TRAINING, "steps": 30},
            },
            "trainer": {"image": IMAGE, "backoffLimit": 1},
            "branchDefaults": BRANCH_TRAINING,
            "maxConcurrentBranches": 2,
        },
    }
    body["spec"].update(spec)
    return body


def branch_body(name: str, forest: str, domain: str, bucket: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmBranch",
        "metadata": {"name": name},
        "spec": {
            "forest": forest,
            "domain": domain,
            "data": {
                "train": [f"{bucket}/data/{domain}/train.txt"],
                "validation": [f"{bucket}/data/{domain}/valid.txt"],
            },
            **spec,
        },
    }


def read_manifest(endpoint: str, bucket_uri: str, forest: str) -> Manifest:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = bucket_uri.removeprefix("s3://")
    try:
        data = client.get_object(Bucket=bucket, Key=f"forests/{forest}/manifest.json")["Body"]
    except client.exceptions.NoSuchKey:
        return Manifest()
    return Manifest.model_validate(json.loads(data.read()))

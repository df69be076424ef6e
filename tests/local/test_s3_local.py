"""Local mode with the forest's storage on S3 (moto server): the same YAML as a cluster's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

pytestmark = pytest.mark.slow
TRAINING = {"batchSize": 4, "seqLen": 32, "evalBatches": 2, "warmupSteps": 1}


def test_up_with_s3_storage(tmp_path: Path, s3_endpoint: str, s3_bucket: str, corpus: Path) -> None:
    forest = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmForest",
        "metadata": {"name": "remote"},
        "spec": {
            "storage": {"uri": f"s3://{s3_bucket}/forests/remote", "endpoint": s3_endpoint},
            "model": {"dModel": 16, "nLayers": 1, "nHeads": 2, "contextLength": 32},
            "tokenizer": {"vocabSize": 300},
            "seed": {
                "data": [str(corpus / "cooking" / "train.txt")],
                "training": {**TRAINING, "steps": 3},
            },
            "branchDefaults": {**TRAINING, "steps": 2},
        },
    }
    branch = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmBranch",
        "metadata": {"name": "sailing"},
        "spec": {
            "forest": "remote",
            "domain": "sailing",
            "data": {"train": [str(corpus / "sailing" / "train.txt")]},
        },
    }
    (tmp_path / "forest.yaml").write_text(yaml.safe_dump_all([forest, branch]))
    done = subprocess.run(
        [sys.executable, "-m", "elmforest", "up", "-f", str(tmp_path), "--no-report"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    manifest = json.loads(
        s3.get_object(Bucket=s3_bucket, Key="forests/remote/manifest.json")["Body"].read()
    )
    assert list(manifest["experts"]) == ["sailing"] and manifest["seed"] is not None
    assert not (tmp_path / ".elmforest" / "storage").exists()  # nothing stored locally

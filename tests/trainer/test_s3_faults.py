"""S3 faults between the trainer and a real S3 protocol server (moto), through a fault proxy:
5xx, throttling (SlowDown), 412 races on the manifest and stalls are retried; a fault that
outlasts the retries exits 75 (transient), and the next attempt resumes from the last
committed checkpoint, losing at most one checkpoint interval."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from elmcore.manifest import Manifest
from elmcore.storage import open_storage
from elmcore.storage.commit import fetch_committed
from tests.conftest import elmtrain
from tests.harness.s3proxy import S3Fault, S3FaultProxy

pytestmark = pytest.mark.slow
MODEL = json.dumps({"d_model": 16, "n_layers": 1, "n_heads": 2, "context_length": 32})
TRAINING = json.dumps(
    {"steps": 12, "batch_size": 4, "seq_len": 32, "checkpoint_interval": 5, "eval_batches": 2}
)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[S3FaultProxy]:
    running = S3FaultProxy(s3_endpoint).start()
    yield running
    running.stop()


def forest_with_tokenizer(proxy: S3FaultProxy, bucket: str, corpus: Path, name: str) -> str:
    client = boto3.client("s3", endpoint_url=proxy.upstream, region_name="us-east-1")
    client.upload_file(str(corpus / "cooking" / "train.txt"), bucket, f"{name}/data/train.txt")
    forest = f"s3://{bucket}/{name}/forest"
    elmtrain(
        "tokenizer", "--forest", forest, "--s3-endpoint", proxy.url,
        "--data", f"s3://{bucket}/{name}/data/train.txt", "--vocab-size", "300", "--merge",
    )  # fmt: skip
    return forest


def seed(forest: str, proxy: S3FaultProxy, bucket: str, name: str, **kw: object) -> object:
    return elmtrain(
        "seed", "--forest", forest, "--s3-endpoint", proxy.url,
        "--data", f"s3://{bucket}/{name}/data/train.txt",
        "--model", MODEL, "--training", TRAINING, "--merge",
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_training_rides_out_s3_faults(
    proxy: S3FaultProxy, s3_bucket: str, corpus: Path, tmp_path: Path
) -> None:
    forest = forest_with_tokenizer(proxy, s3_bucket, corpus, "rides")
    proxy.faults += [
        S3Fault("GET", r"/data/train\.txt$", 0, stall_seconds=1.5),
        S3Fault("PUT", r"/checkpoints/step-0+5/model\.safetensors$", 500, times=2),
        S3Fault("PUT", r"/checkpoints/step-0+10/COMMITTED\.json$", 503, code="SlowDown"),
        S3Fault("PUT", r"/seed/model\.safetensors$", 500),
        S3Fault("PUT", r"/manifest\.json$", 503, times=2, code="SlowDown"),
        S3Fault("PUT", r"/manifest\.json$", 412, code="PreconditionFailed"),  # a lost race
    ]
    seed(forest, proxy, s3_bucket, "rides")
    assert [f for f in proxy.faults if f.hits < f.times] == []  # every fault was met
    storage = open_storage(forest, endpoint=proxy.upstream)
    manifest = Manifest.model_validate_json(storage.read_bytes("manifest.json"))
    assert manifest.seed is not None and manifest.revision == 2  # tokenizer, seed: once each
    # The committed seed verifies file by file against its marker's sha256s.
    fetch_committed(storage, manifest.seed.path, tmp_path / "seed", manifest.seed.sha256)


def test_a_fault_beyond_retries_is_transient_and_resumes(
    proxy: S3FaultProxy, s3_bucket: str, corpus: Path
) -> None:
    forest = forest_with_tokenizer(proxy, s3_bucket, corpus, "resumes")
    proxy.faults.append(S3Fault("PUT", r"/checkpoints/step-0+10/", 500, times=100))
    failed = seed(forest, proxy, s3_bucket, "resumes", check=False,
                  env={"ELMFOREST_S3_MAX_ATTEMPTS": "2"})  # fmt: skip
    assert failed.returncode == 75, failed.stderr[-2000:]  # type: ignore[attr-defined]
    assert "elmtrain seed: transient:" in failed.stderr  # type: ignore[attr-defined]
    proxy.faults.clear()
    done = seed(forest, proxy, s3_bucket, "resumes")
    resumed = [
        json.loads(line) for line in done.stderr.splitlines() if "checkpoint.resumed" in line
    ]  # type: ignore[attr-defined]
    assert [r["step"] for r in resumed] == [5]  # lost 5 steps at most: one interval
    storage = open_storage(forest, endpoint=proxy.upstream)
    manifest = Manifest.model_validate_json(storage.read_bytes("manifest.json"))
    assert manifest.seed is not None

"""A cluster whose Jobs run the stand-in trainer (tests/harness/standin.py), S3 behind a proxy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from elmcore.storage import Storage, open_storage
from tests.harness.cluster import Cluster
from tests.harness.s3proxy import S3FaultProxy
from tests.operator.conftest import forest_body
from tests.reliability.scenario import STANDIN, Rig
from tests.reliability.sweep import base_env


@pytest.fixture
def rig(s3_endpoint: str, seeded_forest: Path, tmp_path: Path) -> Rig:
    """What the crash sweep needs; the session's real tokenizer and seed are the templates."""
    return Rig(s3_endpoint, seeded_forest, tmp_path / "runs", base_env())


@dataclass
class StandinForest:
    cluster: Cluster
    proxy: S3FaultProxy
    bucket: str
    storage: Storage  # the forest's storage, read past the proxy

    def forest(self, name: str, **spec: object) -> dict[str, object]:
        return forest_body(name, f"s3://{self.bucket}", self.proxy.url, **spec)


@pytest.fixture
def standin(rig: Rig, s3_bucket: str, tmp_path: Path) -> Iterator[StandinForest]:
    env = {
        **rig.base_env,
        "STANDIN_TEMPLATES": str(rig.templates),
        "STANDIN_S3_ENDPOINT": rig.s3_endpoint,
        "STANDIN_SECONDS": "0.3",
        "STANDIN_GATE": str(tmp_path / "release"),
        "ELMFOREST_S3_READ_TIMEOUT": "2",  # a stalled S3 answer times out (and is retried) soon
    }
    proxy = S3FaultProxy(rig.s3_endpoint).start()
    cluster = Cluster(tmp_path, env, programs={"elmtrain": STANDIN}).start()
    cluster.secret("s3-creds", {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"})
    storage = open_storage(f"s3://{s3_bucket}/forests/bulk", endpoint=rig.s3_endpoint)
    try:
        yield StandinForest(cluster, proxy, s3_bucket, storage)
    finally:
        cluster.stop()
        proxy.stop()

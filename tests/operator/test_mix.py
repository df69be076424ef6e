"""spec.mix through the real operator against the emulator: once the branches merge, one mix
Job runs (the real ``elmtrain mix-forest`` in the kubelet), its result is recorded in the
manifest exactly once, and a new expert version makes the next mix."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from tests.harness.cluster import Cluster
from tests.operator.conftest import BRANCH_TRAINING, branch_body, forest_body, read_manifest

pytestmark = pytest.mark.slow

DOMAINS = ("cooking", "sailing")
TINY = {**BRANCH_TRAINING, "steps": 4, "checkpointInterval": 2, "evalBatches": 1}


def mix_status(cluster: Cluster) -> dict[str, Any]:
    status: dict[str, Any] = cluster.get("ElmForest", "mixed").get("status") or {}
    mix: dict[str, Any] = status.get("mix") or {}
    if mix.get("phase") == "Failed":
        raise AssertionError(f"the mix failed: {mix}\n{cluster.operator_log()[-4000:]}")
    return mix


def merges_of_mixes(cluster: Cluster) -> list[str]:
    """The operator's log lines that merged a mix run into the manifest."""
    found = []
    for line in cluster.operator_log().splitlines():
        try:
            record = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        change = str(record.get("change", ""))
        if record.get("event") == "storage.changed" and change.startswith("merged mix."):
            found.append(change)
    return found


def test_mix_job_runs_once_and_is_recorded_once(
    cluster: Cluster, s3_data: str, s3_endpoint: str
) -> None:
    cluster.start_operator()
    model = {"family": "llama", "dModel": 32, "nLayers": 1, "nHeads": 2, "contextLength": 64}
    body = forest_body("mixed", s3_data, s3_endpoint, model=model, branchDefaults=TINY)
    body["spec"]["seed"]["training"] = {**TINY, "steps": 6}
    body["spec"]["mix"] = {"enabled": True, "steps": 2}
    cluster.create(body)
    for domain in DOMAINS:
        cluster.create(branch_body(f"mixed-{domain}", "mixed", domain, s3_data))
    cluster.wait_for(
        "mix v1 recorded", lambda: mix_status(cluster).get("revision") == 1, timeout=480
    )

    manifest = read_manifest(s3_endpoint, s3_data, "mixed")
    assert manifest.mix is not None and manifest.mix.mix.number == 1
    assert manifest.mix.experts() == dict.fromkeys(DOMAINS, 1)
    status = mix_status(cluster)
    assert status["phase"] == "Ready" and status["experts"] == dict.fromkeys(DOMAINS, 1)
    assert status["uri"].endswith(manifest.mix.path) and status["finetuneSteps"] == 2
    mix_jobs = {n: c for n, c in cluster.jobs_created().items() if "-mix-" in n}
    assert list(mix_jobs.values()) == [1], mix_jobs  # one Job, created once, run once
    (job,) = mix_jobs
    assert cluster.job_runs(job) == 1
    args = cluster.get("Job", job)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "mix-forest" and args[args.index("--experts") + 1] == ("cooking=1,sailing=1")
    conditions = cluster.get("ElmForest", "mixed")["status"]["conditions"]
    assert {c["type"]: c["status"] for c in conditions}["MixReady"] == "True"

    # A new expert version: the next mix is made from it, and recorded once more.
    cluster.patch("ElmBranch", "mixed-sailing", {"spec": {"training": {"steps": 5}}})
    cluster.wait_for(
        "mix v2 recorded", lambda: mix_status(cluster).get("revision") == 2, timeout=480
    )
    manifest = read_manifest(s3_endpoint, s3_data, "mixed")
    assert manifest.mix is not None and manifest.mix.experts() == {"cooking": 1, "sailing": 2}
    mix_jobs = {n: c for n, c in cluster.jobs_created().items() if "-mix-" in n}
    assert sorted(mix_jobs.values()) == [1, 1], mix_jobs
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    listed = client.list_objects_v2(
        Bucket=s3_data.removeprefix("s3://"), Prefix="forests/mixed/moe/"
    )
    folders = {o["Key"].split("/")[3] for o in listed.get("Contents", [])}
    assert folders == {manifest.mix.path.split("/")[1]}  # mix 1's folders deleted once 2 landed
    merged = merges_of_mixes(cluster)
    assert len(merged) == 2 and len(set(merged)) == 2, merged  # each mix merged exactly once
    assert cluster.unpermitted_requests() == []

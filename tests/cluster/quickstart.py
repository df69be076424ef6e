"""The quickstart's forest on a cluster: its data in S3, its YAML with ``s3://`` locations, the
credentials Secret, and the reads a user makes of it (``kubectl get eb/ef``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import yaml

from tests.harness import imagebuild
from tests.harness.controlplane import free_port
from tests.harness.kubectl import Kube
from tests.local.test_quickstart import QUICKSTART, TINY_MODEL, TINY_TRAINING

DOMAINS = ("code", "legal", "quotes", "scripture")
FOREST = "quickstart"


def s3_yaml(
    folder: Path,
    bucket: str,
    endpoint: str,
    seed_steps: int = 60,
    edit: Callable[[dict[str, Any]], None] = lambda body: None,
) -> None:
    """The quickstart's YAML for a cluster: s3:// data and storage, a tiny model, few steps;
    ``edit`` changes each object further."""

    def located(paths: list[str]) -> list[str]:
        return [f"s3://{bucket}/{p}" for p in paths]

    for path in folder.glob("*.yaml"):
        body = yaml.safe_load(path.read_text())
        spec = body["spec"]
        if body["kind"] == "ElmForest":
            spec["storage"] = {
                "uri": f"s3://{bucket}/forests/{FOREST}",
                "endpoint": endpoint,
                "region": "us-east-1",
                "credentialsSecret": "s3-creds",
            }
            spec["model"] = TINY_MODEL
            spec["tokenizer"]["vocabSize"] = 512
            spec["seed"] = {
                "data": located(spec["seed"]["data"]),
                "valData": located(spec["seed"]["valData"]),
                "training": {**TINY_TRAINING, "steps": seed_steps},
            }
            spec["branchDefaults"] = {**TINY_TRAINING, "steps": 6}
        else:
            spec["data"] = {k: located(v) for k, v in spec["data"].items()}
        edit(body)
        path.write_text(yaml.safe_dump(body, sort_keys=False))


def on_s3(
    kube: Kube,
    namespace: str,
    endpoint: str,
    bucket: str,
    folder: Path,
    seed_steps: int = 60,
    edit: Callable[[dict[str, Any]], None] = lambda body: None,
) -> Path:
    """Upload the quickstart's data, write its YAML for the cluster into ``folder`` and the
    credentials Secret into ``namespace``; returns the folder to ``kubectl apply -f``."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in (QUICKSTART / "data").rglob("*.txt"):
        s3.upload_file(str(path), bucket, str(path.relative_to(QUICKSTART)))  # data/...
    shutil.copytree(QUICKSTART, folder, ignore=shutil.ignore_patterns("data", ".elmforest"))
    s3_yaml(folder, bucket, endpoint, seed_steps, edit)
    kube.kubectl(
        "create",
        "secret",
        "generic",
        "s3-creds",
        "-n",
        namespace,
        "--from-literal=AWS_ACCESS_KEY_ID=testing",
        "--from-literal=AWS_SECRET_ACCESS_KEY=testing",
    )
    return folder


def branches(kube: Kube, ns: str) -> dict[str, dict[str, Any]]:
    items = kube.json("get", "eb", "-n", ns)["items"]
    return {b["metadata"]["name"]: b.get("status") or {} for b in items}


def all_merged(kube: Kube, ns: str, names: tuple[str, ...]) -> bool:
    """Every named branch Merged; a Failed forest or branch ends the wait at once."""
    forest = kube.json("get", "ef", FOREST, "-n", ns).get("status") or {}
    assert forest.get("phase") != "Failed", forest
    statuses = branches(kube, ns)
    failed = {n: s for n, s in statuses.items() if n in names and s.get("phase") == "Failed"}
    assert not failed, failed
    return all(statuses.get(n, {}).get("phase") == "Merged" for n in names)


def node_chart(**more: str) -> dict[str, str]:
    """The chart's values for a forest that trains on the test node: one replica (still behind
    the Lease: pods share this machine's network, where a standby's health port would clash
    with the leader's; two replicas are tests/cluster/test_leader_election.py's), ports of its
    own, resyncs every 2 s, CPU trainers; ``more`` on top."""
    return {
        "healthPort": str(free_port()),
        "replicas": "1",
        "metrics.port": str(free_port()),
        "resyncSeconds": "2",
        "trainer.gpus": "0",
        "trainer.resources.requests.cpu": "1",
        "trainer.resources.requests.memory": "1Gi",
        "trainer.resources.limits.memory": "8Gi",
        **more,
    }


def built_images(digests: dict[str, str]) -> dict[str, str]:
    """The chart's values for the images ``make images`` built (the node runs them in podman)."""
    return {
        "image.repository": f"{imagebuild.REPOSITORY}-operator",
        "image.digest": digests["operator"],
        "trainer.image": f"{imagebuild.REPOSITORY}-trainer@{digests['trainer']}",
    }


def container_ids(kube: Kube, namespace: str) -> dict[str, str]:
    """pod name -> its container's ID (``podman://...`` where it ran in a container)."""
    pods = kube.json("get", "pods", "-n", namespace)["items"]
    return {
        p["metadata"]["name"]: status.get("containerID", "")
        for p in pods
        for status in p.get("status", {}).get("containerStatuses") or []
    }

"""Guardrails on the real control plane: the chart's ``policy`` values refuse what a forest may
not name (Ready=False, reason Forbidden, the value and the rule in the message), and nothing
runs for it; a forest inside them starts as usual. A Secret that is not UTF-8 text is bad
input on the forest, never a crash. The operator runs as a process with the chart's identity,
args and env (tests/cluster/chart_operator.py)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.chart_operator import operator_command, token_kubeconfig
from tests.cluster.conftest import TRAINER_IMAGE, Release, install_chart, tiny_forest
from tests.harness.kubectl import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ALLOWED_REPOSITORY = TRAINER_IMAGE.split("trainer@")[0]  # registry.example.com/elmforest/
OTHER_IMAGE = "docker.io/someone/trainer@sha256:" + "ef" * 32
UNSCHEDULABLE = {"nodeSelector.elmforest-test/unschedulable": "true"}  # we run the operator
DEAD_ENDPOINT = "http://127.0.0.1:9"  # allowed, but nothing answers: storage unreachable


@pytest.fixture
def guarded(kube: Kube, installed_crds: Kube, s3_endpoint: str, s3_bucket: str) -> Release:
    return install_chart(
        kube,
        "guarded",
        "guarded",
        strings=UNSCHEDULABLE,
        settings={
            "policy.trainerImageRepositories": f"{{{ALLOWED_REPOSITORY}}}",
            "policy.storageEndpoints": f"{{{s3_endpoint},{DEAD_ENDPOINT}}}",
            "policy.buckets": f"{{{s3_bucket[:4]}*}}",
            "policy.serviceAccounts": "{default,trainer}",
            "policy.operatorStorageIdentity": "false",
            # Accepted by the API server (this plane's network enforces no NetworkPolicy).
            "networkPolicy.enabled": "true",
            "networkPolicy.apiServer.cidrs": "{127.0.0.1/32}",
            "networkPolicy.storage.cidrs": "{127.0.0.1/32}",
        },
    )


@pytest.fixture
def operator(kube: Kube, guarded: Release, tmp_path: Path) -> Iterator[Path]:
    args, env = operator_command(kube, guarded)
    log = tmp_path / "operator.log"
    kubeconfig = token_kubeconfig(kube, guarded, tmp_path)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "elmforest", *args],
            env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_each_guardrail_refuses_and_nothing_runs(
    kube: Kube, guarded: Release, operator: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    ns = guarded.watched
    secrets = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "binary-creds"},
            "data": {
                "AWS_ACCESS_KEY_ID": base64.b64encode(b"\xff\xfe\x00key").decode(),
                "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"testing").decode(),
            },
        },
    ]
    allowed = tiny_forest("allowed", s3_bucket, s3_endpoint)
    refused = {
        "image": (tiny_forest("image", s3_bucket, s3_endpoint, image=OTHER_IMAGE), "trainerImage"),
        "account": (
            tiny_forest("account", s3_bucket, s3_endpoint, serviceAccountName="admin"),
            "policy.serviceAccounts",
        ),
        "endpoint": (tiny_forest("endpoint", s3_bucket, "http://127.0.0.1:1"), "storageEndpoints"),
        "bucket": (tiny_forest("bucket", "zz-other-bucket", s3_endpoint), "policy.buckets"),
        "identity": (tiny_forest("identity", s3_bucket, s3_endpoint), "credentialsSecret"),
    }
    del refused["identity"][0]["spec"]["storage"]["credentialsSecret"]
    binary = tiny_forest("binary", s3_bucket, s3_endpoint)
    binary["spec"]["storage"]["credentialsSecret"] = "binary-creds"
    kube.apply([*secrets, allowed, binary, *(body for body, _ in refused.values())], "-n", ns)

    def ready(name: str) -> dict[str, Any] | None:
        status = kube.json("get", "ef", name, "-n", ns).get("status") or {}
        found = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        return found[0] if found and found[0]["status"] == "False" else None

    def jobs(name: str) -> list[Any]:
        selector = f"btm.elmforest.io/forest={name}"
        items: list[Any] = kube.json("get", "jobs", "-n", ns, "-l", selector)["items"]
        return items

    def alive() -> str | None:
        text = operator.read_text()
        return f"the operator crashed:\n{text[-4000:]}" if "Traceback" in text else None

    policies = kube.json("get", "networkpolicy", "-n", guarded.namespace)["items"]
    assert [p["metadata"]["name"] for p in policies] == [guarded.account]
    # Inside every rule: the forest starts its tokenizer Job as with no policy at all.
    wait_for("the allowed forest's tokenizer Job", lambda: jobs("allowed"), alive=alive)
    for name, (_, rule) in refused.items():
        condition = wait_for(f"{name} refused", lambda n=name: ready(n), alive=alive)
        assert condition["reason"] == "Forbidden", condition
        assert rule in condition["message"], condition
        assert jobs(name) == [], name
    condition = wait_for("the binary Secret reported", lambda: ready("binary"), alive=alive)
    assert condition["reason"] == "SecretInvalid", condition
    assert "not UTF-8" in condition["message"], condition
    assert jobs("binary") == []
    # Each refusal is an Event on its forest too (what `kubectl describe ef` shows).
    events = kube.json("get", "events", "-n", ns)["items"]
    warned = {e["involvedObject"]["name"] for e in events if e["type"] == "Warning"}
    assert set(refused) | {"binary"} <= warned, warned


def test_a_deleted_branch_whose_storage_is_unreachable_says_so_until_released(
    kube: Kube, guarded: Release, operator: Path, s3_bucket: str
) -> None:
    """Its expert cannot leave the manifest: the branch keeps its finalizer and says why on
    its status and in an Event, retrying, until the user annotates it released."""
    ns = guarded.watched
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    }
    branch = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmBranch",
        # As if it had merged before its storage went away: its finalizer is already there.
        "metadata": {"name": "stuck", "finalizers": ["btm.elmforest.io/expert"]},
        "spec": {"forest": "gone", "domain": "stuck", "data": {"train": ["s3://b/t.txt"]}},
    }
    kube.apply([secret, tiny_forest("gone", s3_bucket, DEAD_ENDPOINT), branch], "-n", ns)
    kube.kubectl("delete", "eb", "stuck", "-n", ns, "--wait=false")

    def blocked() -> str | None:
        message = str(
            (kube.json("get", "eb", "stuck", "-n", ns).get("status") or {}).get("message", "")
        )
        return message if message.startswith("cannot remove expert stuck") else None

    message = wait_for("the blocked cleanup reported", blocked, timeout=120)
    assert "btm.elmforest.io/release=true" in message, message
    assert kube.json("get", "eb", "stuck", "-n", ns)["metadata"]["finalizers"]
    events = kube.json("get", "events", "-n", ns)["items"]
    assert any(e["reason"] == "CleanupBlocked" for e in events), events
    kube.kubectl("annotate", "eb", "stuck", "-n", ns, "btm.elmforest.io/release=true")
    wait_for(
        "the released branch gone",
        lambda: kube.kubectl("get", "eb", "stuck", "-n", ns, check=False).returncode != 0,
        timeout=60,
    )

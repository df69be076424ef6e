"""The trainer image, built here (``make images``), run as Kubernetes runs the operator's pods
(issue 29 point 2): each pod spec is the planner's own (a tokenizer, seed and branch Job, then
the serving Deployment), run by podman with its securityContext (uid 10001, read-only root,
every capability dropped, no privilege escalation), its emptyDir volumes, no service-account
token, and its env with the Secret's values, against the suite's S3 server (moto); the served
forest answers the ``openai`` client.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest

from elmforest.api.branch import ElmBranchSpec
from elmforest.api.forest import ElmForestSpec
from elmforest.planner.jobs import JobRequest, Owner, build_job
from elmforest.planner.serving import deployment
from elmforest.planner.trainer_args import branch_argv, seed_argv, tokenizer_argv
from tests.harness import imagebuild
from tests.harness.podrun import PodRefusedError, podman, run_command

pytestmark = pytest.mark.slow
SECRET = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def trainer_image(image_digests: dict[str, str]) -> str:
    """The image by digest, as a forest names it."""
    return f"{imagebuild.REPOSITORY}-trainer@{image_digests['trainer']}"


def resolved_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's env as a kubelet resolves it: values, the Secret's keys, field refs."""
    env = {}
    for item in container.get("env") or []:
        source = item.get("valueFrom") or {}
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in source:
            value = SECRET.get(source["secretKeyRef"]["key"])
            if value is None and not source["secretKeyRef"].get("optional"):
                raise PodRefusedError(f"secret key {source['secretKeyRef']['key']} missing")
            if value is not None:
                env[item["name"]] = value
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
    return env


def run_job(body: dict[str, Any], folder: Path) -> None:
    spec = body["spec"]["template"]["spec"]
    name = body["metadata"]["name"]
    folder.mkdir(parents=True)
    command = run_command(spec, name=name, env=resolved_env(spec["containers"][0], name),
                          folder=folder)  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"


def job(spec: ElmForestSpec, role: str, argv: list[str]) -> dict[str, Any]:
    request = JobRequest(name=f"quick-{role}", namespace="ns", owner=Owner("ElmForest", "q", "u"),
                         forest="q", role=role, run_id=role, argv=argv, trainer=spec.trainer,
                         storage=spec.storage)  # fmt: skip
    return build_job(request)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_trainer_image_trains_a_forest_and_serves_it_as_its_pods_run(
    trainer_image: str, s3_endpoint: str, s3_bucket: str, corpus: Path, tmp_path: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for path in corpus.rglob("*.txt"):
        client.upload_file(str(path), s3_bucket, f"data/{path.relative_to(corpus).as_posix()}")
    data = f"s3://{s3_bucket}/data"
    training = {"steps": 12, "batchSize": 8, "seqLen": 64, "progressIntervalSeconds": 1}
    spec = ElmForestSpec.model_validate({
        "storage": {"uri": f"s3://{s3_bucket}/forest", "endpoint": s3_endpoint,
                    "credentialsSecret": "keys"},
        "trainer": {"image": trainer_image, "resources": {"limits": {"cpu": "2", "memory": "6Gi"}}},
        "model": {"family": "gpt2", "dModel": 64, "nLayers": 2, "nHeads": 2, "contextLength": 64},
        "tokenizer": {"vocabSize": 512},
        "seed": {"data": [f"{data}/cooking/train.txt", f"{data}/sailing/train.txt"],
                 "training": training},
        "serving": {"port": free_port()},
    })  # fmt: skip
    branch = ElmBranchSpec.model_validate({
        "forest": "q", "domain": "cooking",
        "data": {"train": [f"{data}/cooking/train.txt"],
                 "validation": [f"{data}/cooking/valid.txt"]},
        "training": training,
    })  # fmt: skip
    # The operator merges each Job's result; here the trainer's own --merge does (same record).
    steps = [("tokenizer", [*tokenizer_argv(spec), "--merge"]),
             ("seed", [*seed_argv(spec), "--merge"]),
             ("branch", [*branch_argv(spec, branch, 1), "--merge"])]  # fmt: skip
    for role, argv in steps:
        body = job(spec, role, argv)
        pod = body["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        run_job(body, tmp_path / role)
    manifest = client.get_object(Bucket=s3_bucket, Key="forest/manifest.json")["Body"].read()
    assert b'"cooking"' in manifest

    served = deployment("q", "ns", Owner("ElmForest", "q", "u"), spec)["spec"]["template"]["spec"]
    name = "q-serve-0"
    (tmp_path / "serve").mkdir()
    command = run_command(served, name=name, env=resolved_env(served["containers"][0], name),
                          folder=tmp_path / "serve", detach=True)  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    base = f"http://127.0.0.1:{spec.serving.port if spec.serving else 8000}"
    try:
        wait_ready(f"{base}/readyz", name)
        import openai

        api = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        models = {m.id for m in api.models.list()}
        assert {"q", "q/seed", "q/expert/cooking"} <= models, models
        completion = api.completions.create(model="q", prompt="The", max_tokens=5)
        assert completion.usage is not None and completion.usage.completion_tokens > 0
    finally:
        subprocess.run(podman("rm", "--force", "--time", "5", name), capture_output=True,
                       check=False)  # fmt: skip


def wait_ready(url: str, container: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    logs = subprocess.run(podman("logs", container), capture_output=True, text=True, check=False)
    raise AssertionError(f"{container} not ready: {(logs.stdout + logs.stderr)[-3000:]}")

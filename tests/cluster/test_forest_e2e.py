"""A forest end to end on the real control plane, as a user runs it, judged by Kubernetes itself.

``helm install`` the chart with the images ``make images`` built (the operator's pod runs on
the process kubelet, in container mode: in its image, by podman, as the chart's ServiceAccount),
S3 from moto, ``kubectl apply -f`` the quickstart's YAML with ``s3://`` storage; the seed and
four branches train with the real ``elmtrain`` in pods run in the trainer image,
under the real Job controller, garbage collector and scheduler, and the forest is served (its
Deployment's pod answers through its Service's endpoint). Then, on the same cluster: a
branch's training is edited (version 2 replaces version 1) while its pod is evicted twice (with
and without grace) and the operator's pod is deleted; a branch with ``retention: Delete`` is
deleted (its Jobs go by garbage collection); a branch whose data has no text fails at once.
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest
import yaml

from elmcore.manifest import Manifest
from tests.cluster import quickstart
from tests.cluster.conftest import Release, install_chart
from tests.cluster.quickstart import DOMAINS, all_merged, branches
from tests.harness.controlplane import free_port
from tests.harness.kubectl import Kube, wait_for
from tests.harness.nodeagent import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
# A forest trains for minutes on 2 cores: patient waits by default.
wait = partial(wait_for, timeout=300, every=1.0)
GROUP_LABEL = "btm.elmforest.io"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


def _edits(serving_port: int) -> Any:
    """The quickstart's YAML, served on ``serving_port``, with legal's files deleted with it."""

    def edit(body: dict[str, Any]) -> None:
        if body["kind"] == "ElmForest":
            body["spec"]["serving"] = {"port": serving_port, "pollSeconds": 1}
        if body["kind"] == "ElmBranch" and body["spec"]["domain"] == "legal":
            body["spec"]["retention"] = "Delete"

    return edit


def _served(kube: Kube, ns: str, revision: int) -> dict[str, Any] | None:
    """The forest's serving status once its one replica is ready and serves ``revision``."""
    serving = kube.json("get", "ef", "quickstart", "-n", ns).get("status", {}).get("serving")
    ready = serving and serving.get("replicas") == 1 and serving.get("revision") == revision
    return serving if ready else None


def _service_endpoint(kube: Kube, ns: str, service: str) -> str | None:
    """``ip:port`` of the Service's ready endpoint, as Kubernetes' EndpointSlice controller
    wrote it (no kube-proxy here: the address is the pod's own)."""
    label = f"kubernetes.io/service-name={service}"
    for item in kube.json("get", "endpointslices", "-n", ns, "-l", label)["items"]:
        port = (item.get("ports") or [{}])[0].get("port")
        for endpoint in item.get("endpoints") or []:
            if endpoint.get("conditions", {}).get("ready") and port:
                return f"{endpoint['addresses'][0]}:{port}"
    return None


def _jobs(kube: Kube, ns: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kube.json("get", "jobs", "-n", ns, "-l", selector)["items"]
    return items


def _running_pod(kube: Kube, ns: str, selector: str) -> str | None:
    for pod in kube.json("get", "pods", "-n", ns, "-l", selector)["items"]:
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            return str(pod["metadata"]["name"])
    return None


def _logged_steps(node: ProcessKubelet, ns: str, pod: str, event: str) -> list[int]:
    steps = []
    for line in node.log_of(ns, pod).splitlines():
        start = line.find("{")
        if start >= 0 and event in line:
            try:
                steps.append(int(json.loads(line[start:])["step"]))
            except (ValueError, KeyError):
                continue
    return steps


def _audit_lines(kube: Kube) -> int:
    assert kube.plane is not None
    return len(kube.plane.audit_records())


def _operator_writes(kube: Kube, user: str, after: int) -> list[str]:
    """What ``user`` changed in the API since audit line ``after`` (reads do not count)."""
    assert kube.plane is not None
    writes = []
    for record in kube.plane.audit_records()[after:]:
        ref = record.get("objectRef", {})
        # The leader renews its Lease every few seconds whatever happens: a heartbeat, not a
        # response to anything; every other write counts.
        if ref.get("resource") == "leases":
            continue
        if record["user"]["username"] == user and record["verb"] in WRITES:
            writes.append(
                f"{record['verb']} {ref.get('resource')}/{ref.get('subresource', '')}"
                f" {ref.get('name')}"
            )
    return writes


def _evict(kube: Kube, ns: str, pod: str, grace: int | None) -> None:
    body: dict[str, Any] = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": ns},
    }
    if grace is not None:
        body["deleteOptions"] = {"gracePeriodSeconds": grace}
    kube.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{ns}/pods/{pod}/eviction",
        "-f",
        "-",
        stdin=json.dumps(body),
    )


@pytest.mark.timeout(1500)  # a whole forest and its life on 2 cores: many minutes
def test_quickstart_forest_on_a_real_control_plane(
    kube: Kube,
    node: ProcessKubelet,
    image_digests: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    # The images built here, run by the node in container mode: every pod of the operator and
    # the forest runs in them as its spec says (uid 10001, read-only root, no capabilities).
    release: Release = install_chart(
        kube,
        "e2e",
        "forest",
        settings=quickstart.node_chart(**quickstart.built_images(image_digests)),
    )
    ns = release.watched
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    serving_port = free_port()
    folder = quickstart.on_s3(
        kube, ns, s3_endpoint, s3_bucket, tmp_path / "quickstart", edit=_edits(serving_port)
    )
    kube.kubectl("apply", "-f", str(folder), "-n", ns)

    def manifest() -> Manifest:
        data = s3.get_object(Bucket=s3_bucket, Key="forests/quickstart/manifest.json")["Body"]
        return Manifest.model_validate(json.loads(data.read()))

    # 1. Everything trains in pods run by the node and merges exactly once.
    wait("four merged branches", lambda: all_merged(kube, ns, DOMAINS), timeout=600)
    wait(
        "the forest Ready with four experts",
        lambda: (
            kube.json("get", "ef", "quickstart", "-n", ns).get("status", {}).get("expertCount") == 4
        ),
    )
    table = kube.kubectl("get", "eb", "-n", ns).stdout.splitlines()
    for line in table[1:]:
        _name, forest, _domain, phase, *rest = line.split()
        assert phase == "Merged" and forest == "quickstart", line
        assert float(rest[-2]) > 1, line  # the perplexity column
    assert "Ready" in kube.kubectl("get", "ef", "-n", ns).stdout
    first = manifest()
    assert sorted(first.experts) == sorted(DOMAINS)
    assert all(e.version == 1 for e in first.experts.values())
    assert first.revision == 2 + len(DOMAINS)  # tokenizer, seed, one merge per branch
    for domain in DOMAINS:
        jobs = [j["metadata"]["name"] for j in _jobs(kube, ns, f"{GROUP_LABEL}/branch={domain}")]
        assert sorted(jobs) == [f"{domain}-v1-a1", f"{domain}-v1-prep"], jobs  # prepare, train
    # The session's node ran other tests' pods before: this release's first is its operator.
    ours = [p for p in node.started_pods if p.startswith((f"{release.namespace}/", f"{ns}/"))]
    assert ours[0].startswith(f"{release.namespace}/e2e-elmforest-"), ours[:3]
    ran = {
        **quickstart.container_ids(kube, release.namespace),
        **quickstart.container_ids(kube, ns),
    }
    assert all(cid.startswith("podman://") for cid in ran.values()), ran

    # Serving: the forest's Deployment runs `elmtrain serve` in a pod on the node, behind a
    # Service whose endpoint Kubernetes publishes once the pod's readiness probe answers; the
    # forest's status shows the endpoint and the revision served. A request through the
    # Service's endpoint is answered by the forest's experts.
    serving = wait("the forest served", lambda: _served(kube, ns, manifest().revision))
    assert serving["endpoint"] == f"http://quickstart-serve.{ns}.svc:{serving_port}/v1"
    address = wait(
        "the Service's endpoint", lambda: _service_endpoint(kube, ns, "quickstart-serve")
    )
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=2)
    answer = client.completions.create(model="quickstart", prompt="def main():", max_tokens=6)
    routed = (answer.model_extra or {})["elmforest"]
    assert routed["revision"] == manifest().revision
    assert {e["expert"] for e in routed["routing"][0]["experts"]} <= set(DOMAINS)
    assert answer.usage is not None and answer.usage.completion_tokens >= 1

    # GitOps: every file re-applied unchanged, server-side, under another field manager (as
    # Argo CD syncs): no new version, no new Job, and the operator writes nothing in response.
    user = f"system:serviceaccount:{release.namespace}:{release.account}"
    versions = {n: s.get("version") for n, s in branches(kube, ns).items()}
    mark = _audit_lines(kube)
    kube.kubectl(
        "apply", "--server-side", "--field-manager=argocd-controller", "-f", str(folder), "-n", ns
    )
    time.sleep(8)  # several of the operator's resyncs (2 s) and progress polls
    assert _operator_writes(kube, user, mark) == []
    assert {n: s.get("version") for n, s in branches(kube, ns).items()} == versions
    # One more branch file, the folder applied again: only that domain trains.
    extra = yaml.safe_load((folder / "branch-quotes.yaml").read_text())
    extra["metadata"]["name"], extra["spec"]["domain"] = "extra", "extra"
    extra["spec"]["data"] = {"train": [f"s3://{s3_bucket}/data/quotes/valid.txt"]}
    (folder / "branch-extra.yaml").write_text(yaml.safe_dump(extra))
    kube.kubectl(
        "apply", "--server-side", "--field-manager=argocd-controller", "-f", str(folder), "-n", ns
    )
    wait("extra merged", lambda: all_merged(kube, ns, ("extra",)), timeout=300)
    branch_jobs = kube.json("get", "jobs", "-n", ns, "-l", f"{GROUP_LABEL}/branch")["items"]
    names = sorted(j["metadata"]["name"] for j in branch_jobs)
    domains = (*DOMAINS, "extra")
    assert [n for n in names if not n.endswith("-prep")] == sorted(f"{d}-v1-a1" for d in domains)
    # extra's text is quotes' validation text, prepared already: it gets no prepare Job.
    assert {n for n in names if n.endswith("-prep")} == {f"{d}-v1-prep" for d in DOMAINS}
    assert manifest().revision == first.revision + 1
    first = manifest()

    # 2. Version 2 of quotes, long enough to be interrupted: two evictions and an operator crash.
    kube.kubectl(
        "patch",
        "eb",
        "quotes",
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"training": {"steps": 400, "checkpointInterval": 20}}}),
    )
    selector = f"{GROUP_LABEL}/branch=quotes"
    job = "quotes-v2-a1"
    pod = wait("quotes v2 training", lambda: _running_pod(kube, ns, f"job-name={job}"))
    wait(
        "a committed checkpoint",
        lambda: _logged_steps(node, ns, pod, "checkpoint.committed"),
        every=0.2,
    )
    _evict(kube, ns, pod, grace=None)  # SIGTERM: the trainer checkpoints and exits
    second = wait(
        "a replacement pod", lambda: (p := _running_pod(kube, ns, f"job-name={job}")) != pod and p
    )
    resumed = wait(
        "the replacement to resume",
        lambda: _logged_steps(node, ns, second, "checkpoint.resumed"),
        every=0.2,
    )
    assert resumed[0] >= 20
    operator = _running_pod(kube, release.namespace, "app.kubernetes.io/instance=e2e")
    assert operator is not None
    kube.kubectl(
        "delete",
        "pod",
        operator,
        "-n",
        release.namespace,
        "--grace-period=0",
        "--force",
        "--wait=false",
    )  # the operator dies; its ReplicaSet starts another
    committed = wait(
        "a checkpoint after the resume",
        lambda: [
            s for s in _logged_steps(node, ns, second, "checkpoint.committed") if s > resumed[0]
        ],
        every=0.2,
    )
    _evict(kube, ns, second, grace=0)  # SIGKILL at once
    third = wait(
        "a third pod",
        lambda: (p := _running_pod(kube, ns, f"job-name={job}")) not in (pod, second) and p,
    )
    again = wait(
        "it to resume", lambda: _logged_steps(node, ns, third, "checkpoint.resumed"), every=0.2
    )
    assert again[0] >= committed[-1] - 20, (committed, again)  # within one interval
    wait(
        "quotes v2 merged",
        lambda: all_merged(kube, ns, ("quotes",)) and manifest().experts["quotes"].version == 2,
        timeout=600,
    )

    # One Job for version 2 through two evictions and an operator restart, nothing counted
    # as failed (v1's finished Job stays until its TTL).
    def v2_jobs() -> list[dict[str, Any]]:
        return [j for j in _jobs(kube, ns, selector) if "-v2-" in j["metadata"]["name"]]

    # (the operator merges the committed result; the pod exits a moment later)
    wait("the Job to complete", lambda: v2_jobs()[0]["status"].get("succeeded") == 1)
    status = v2_jobs()
    assert [j["metadata"]["name"] for j in status] == [job], status
    assert status[0]["status"].get("failed", 0) == 0, status[0]["status"]
    assert manifest().revision == first.revision + 1  # one merge for version 2
    # The server followed the forest to quotes v2, and says so through the Service.
    wait("the server on quotes v2", lambda: _served(kube, ns, manifest().revision))
    experts = client.models.list().data[0].model_extra["elmforest"]["experts"]  # type: ignore[index]
    assert {"expert": "quotes", "version": 2} in experts

    # 3. retention: Delete: the expert and its files leave; Kubernetes' GC removes its Jobs.
    kube.kubectl("delete", "eb", "legal", "-n", ns, "--timeout=120s")
    assert "legal" not in manifest().experts
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="forests/quickstart/experts/legal")
    assert listed.get("KeyCount", 0) == 0
    wait(
        "legal's Jobs collected",
        lambda: not _jobs(kube, ns, f"{GROUP_LABEL}/branch=legal"),
        timeout=120,
    )
    if kube.plane is not None:
        deleted_by = set()
        for record in kube.plane.audit_records():
            ref = record.get("objectRef", {})
            if (
                record.get("verb") == "delete"
                and ref.get("resource") == "jobs"
                and ref.get("name", "").startswith("legal-")
            ):
                deleted_by.add(record["user"]["username"])
        assert deleted_by == {"system:serviceaccount:kube-system:generic-garbage-collector"}

    # 4. retention Keep, then the same branch re-created with other data (a GitOps revert and
    # re-add): v1's runs and files stay in storage, and the new branch trains anew as v2.
    code = yaml.safe_load((folder / "branch-code.yaml").read_text())
    kube.kubectl("delete", "eb", "code", "-n", ns, "--timeout=120s")
    assert "code" not in manifest().experts
    assert (
        s3.list_objects_v2(Bucket=s3_bucket, Prefix="forests/quickstart/experts/code/v1")[
            "KeyCount"
        ]
        > 0
    )  # kept
    code["spec"]["data"]["train"] = [f"s3://{s3_bucket}/data/legal/train.txt"]
    kube.apply(code, "-n", ns)
    wait(
        "code merged again",
        lambda: all_merged(kube, ns, ("code",)) and "code" in manifest().experts,
        timeout=300,
    )
    entry = manifest().experts["code"]
    assert entry.version == 2, entry
    jobs = [j["metadata"]["name"] for j in _jobs(kube, ns, f"{GROUP_LABEL}/branch=code")]
    assert jobs == ["code-v2-a1"], jobs  # legal's text is prepared already: no prepare Job
    assert any(p.startswith(f"{ns}/code-v2-a1-") for p in node.started_pods)

    # 5. A branch whose data holds no text fails at once: no retry, Ready=False, an Event.
    s3.put_object(Bucket=s3_bucket, Key="data/empty/train.txt", Body=b"\n\n")
    broken = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmBranch",
        "metadata": {"name": "broken"},
        "spec": {
            "forest": "quickstart",
            "domain": "broken",
            "init": {"strategy": "seed"},
            "data": {"train": [f"s3://{s3_bucket}/data/empty/train.txt"]},
        },
    }
    before = manifest().revision
    kube.apply(broken, "-n", ns)
    failed = wait(
        "broken to fail",
        lambda: (
            branches(kube, ns).get("broken", {}).get("phase") == "Failed"
            and branches(kube, ns)["broken"]
        ),
        timeout=300,
    )
    ready = {c["type"]: c for c in failed["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "BadInput", ready
    assert "train.txt" in ready["message"], ready
    # Its prepare Job found the text empty: no retry, and no training Job (no GPU spent).
    jobs = _jobs(kube, ns, f"{GROUP_LABEL}/branch=broken")
    assert [j["metadata"]["name"] for j in jobs] == ["broken-v1-prep"]
    assert jobs[0]["status"].get("failed") == 1, jobs[0]["status"]  # FailJob: no retry
    events = kube.json("get", "events", "-n", ns, "--field-selector", "involvedObject.name=broken")[
        "items"
    ]
    assert any("train.txt" in e["message"] for e in events), [e["message"] for e in events]
    assert manifest().revision == before
    assert all(branches(kube, ns)[n]["phase"] == "Merged" for n in ("code", "quotes", "scripture"))
    assert re.search(r"quickstart\s+Ready\s+4", kube.kubectl("get", "ef", "-n", ns).stdout)

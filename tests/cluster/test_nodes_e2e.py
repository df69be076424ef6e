"""A ``trainer.nodes: 2`` branch end to end: the operator's Indexed Job on two nodes with DNS.

The chart installs the operator (its pod on the session's node-0); the forest's trainer
tolerates the taint of the two DNS nodes (dns-0, dns-1: each pod its own address, resolv.conf
and host name, CoreDNS answering from the API server), as a user would set it in the forest's
spec. One branch with ``trainer.nodes: 2`` trains over gloo, its ranks rendezvousing at
``<job>-0.<svc>.<ns>.svc`` by the cluster's DNS; once rank 0 has committed a checkpoint one of
the two pods is evicted (the Eviction API), every index gets a new pod that resumes from a step
at or past that checkpoint, and the branch merges exactly once. The operator knows nothing of
the test.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from elmcore.manifest import Manifest
from tests.cluster import quickstart
from tests.cluster.conftest import install_chart
from tests.cluster.quickstart import all_merged
from tests.cluster.test_cluster_dns import TAINT, cluster_dns, dns_nodes
from tests.cluster.test_forest_e2e import GROUP_LABEL, _evict, _jobs, _logged_steps
from tests.harness.kubectl import Kube, wait_for
from tests.harness.nodeagent import ProcessKubelet

__all__ = ["cluster_dns", "dns_nodes"]  # the module's fixtures: dns-0 and dns-1 with CoreDNS

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
wait = partial(wait_for, timeout=300, every=0.5)
INDEX = "batch.kubernetes.io/job-completion-index"
INTERVAL = 20  # checkpointInterval of the branch (a step takes some 30 ms here)
POOL = "elmforest-test/cluster-dns"  # the DNS nodes' label (a node pool's, set by an admin)


def _edit(body: dict[str, Any]) -> None:
    """The quickstart's forest, its trainer on the DNS nodes (their label selected, their taint
    tolerated, as a user sends training to a node pool); quotes on 2 nodes."""
    spec = body["spec"]
    if body["kind"] == "ElmForest":
        toleration = {"key": TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
        spec["trainer"] = {
            **spec.get("trainer", {}),
            "nodeSelector": {POOL: "true"},
            "tolerations": [toleration],
        }
    else:
        spec["init"] = {"strategy": "seed"}
        spec["trainer"] = {"nodes": 2}
        spec["training"] = {"steps": 1000, "checkpointInterval": INTERVAL}


def _gang(kube: Kube, ns: str, job: str) -> dict[str, dict[str, Any]] | None:
    """index -> pod, once each of the two indexes has a running pod (not being deleted)."""
    pods = {
        p["metadata"]["annotations"][INDEX]: p
        for p in kube.json("get", "pods", "-n", ns, "-l", f"job-name={job}")["items"]
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    }
    return pods if len(pods) == 2 else None


def _log_node(nodes: list[ProcessKubelet], pod: dict[str, Any]) -> ProcessKubelet:
    return next(n for n in nodes if n.name == pod["spec"]["nodeName"])


@pytest.mark.timeout(600)
def test_two_node_branch_resumes_after_an_eviction_and_merges_once(
    kube: Kube,
    node: ProcessKubelet,
    dns_nodes: list[ProcessKubelet],
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    release = install_chart(kube, "gang", "gang", settings=quickstart.node_chart())
    ns = release.watched
    kube.kubectl("label", "node", *(n.name for n in dns_nodes), f"{POOL}=true", "--overwrite")
    folder = quickstart.on_s3(
        kube, ns, s3_endpoint, s3_bucket, tmp_path / "quickstart", seed_steps=20, edit=_edit
    )
    kube.kubectl("apply", "-f", str(folder / "forest.yaml"), "-n", ns)
    quotes = yaml.safe_load((folder / "branch-quotes.yaml").read_text())
    kube.apply(quotes, "-n", ns)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def manifest() -> Manifest:
        data = s3.get_object(Bucket=s3_bucket, Key="forests/quickstart/manifest.json")["Body"]
        return Manifest.model_validate(json.loads(data.read()))

    job = "quotes-v1-a1"
    first = wait("both ranks of quotes training", lambda: _gang(kube, ns, job))
    assert sorted(p["spec"]["nodeName"] for p in first.values()) == ["dns-0", "dns-1"]
    # The ranks find index 0 by the cluster's DNS name of its pod, nothing else.
    command = first["0"]["spec"]["containers"][0]["command"]
    assert f"--rdzv-endpoint={job}-0.quotes-nodes.{ns}.svc:29400" in command, command

    def steps(pod: dict[str, Any], event: str) -> list[int]:
        """The steps of ``event`` in ``pod``'s log, wherever it ran."""
        return _logged_steps(_log_node(dns_nodes, pod), ns, pod["metadata"]["name"], event)

    committed = wait(
        "a checkpoint committed by rank 0",
        lambda: steps(first["0"], "checkpoint.committed"),
        every=0.2,
    )
    # Evict index 1 (SIGTERM, as a drain does): the ranks vote to stop, checkpoint, exit 75.
    _evict(kube, ns, first["1"]["metadata"]["name"], grace=None)
    olds = {p["metadata"]["name"] for p in first.values()}

    def replaced() -> dict[str, dict[str, Any]] | None:
        now = _gang(kube, ns, job)
        return now if now and not olds & {p["metadata"]["name"] for p in now.values()} else None

    second = wait("a new pod for every index", replaced)
    assert sorted(p["spec"]["nodeName"] for p in second.values()) == ["dns-0", "dns-1"]
    # Rank 0 (not evicted) checkpointed once more at the stop and exited 75 with the gang.
    log = _log_node(dns_nodes, first["0"]).log_of(ns, first["0"]["metadata"]["name"])
    assert "exit 75" in log, log[-3000:]
    stopped = steps(first["0"], "checkpoint.committed")
    resumed = wait(
        "the new rank 0 to resume", lambda: steps(second["0"], "checkpoint.resumed"), every=0.2
    )
    assert resumed[0] == stopped[-1] >= committed[0], (committed, stopped, resumed)
    wait("quotes merged", lambda: all_merged(kube, ns, ("quotes",)), timeout=300)
    merged = manifest()
    assert merged.revision == 3  # tokenizer, seed, and one merge for quotes
    assert merged.experts["quotes"].version == 1

    def complete() -> dict[str, Any] | None:
        status: dict[str, Any] = kube.json("get", "job", job, "-n", ns).get("status", {})
        done = {c["type"] for c in status.get("conditions", []) if c["status"] == "True"}
        assert "Failed" not in done, status
        return status if "Complete" in done else None

    status = wait("the Job to complete", complete)
    # Both indexes succeeded; the evicted pod is not counted, rank 0's 75 counts once.
    assert (status.get("succeeded"), status.get("failed", 0)) == (2, 1), status
    names = sorted(j["metadata"]["name"] for j in _jobs(kube, ns, f"{GROUP_LABEL}/branch=quotes"))
    assert names == ["quotes-v1-a1", "quotes-v1-prep"], names  # one training Job, no new attempt
    assert manifest().revision == merged.revision  # merged exactly once

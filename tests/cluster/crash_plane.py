"""The crash sweep's cluster on a real control plane (tests/reliability/scenario.py's
``ScenarioCluster``): Kubernetes' own Job controller, garbage collector and scheduler run; only
the operator's death at its writes is on cue.

Each life gets its own release of the chart (helm, namespaces enforcing Pod Security
restricted, the chart's RBAC); the operator runs as a process with the chart's ServiceAccount
token, its API traffic through :class:`ApiCrashProxy`. Trainer Jobs land on a node of their
own (a process kubelet whose ``elmtrain`` is the stand-in trainer, tainted so that no other
test's pod goes there).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.cluster.chart_operator import operator_command, token_kubeconfig
from tests.cluster.conftest import Release, install_chart, start_node
from tests.harness.apiproxy import ApiCrashProxy
from tests.harness.cluster import PATHS, ApiError
from tests.harness.controlplane import ControlPlane
from tests.harness.crashes import CrashSwitch
from tests.harness.kubectl import Kube
from tests.harness.nodeagent import PROGRAMS, ProcessKubelet
from tests.reliability.scenario import STANDIN

STANDIN_TAINT = {"key": "elmforest-test/standin", "value": "true", "effect": "NoSchedule"}
UNSCHEDULABLE = {"nodeSelector.elmforest-test/unschedulable": "true"}  # the chart's own pod


class PlaneCluster:
    # The chart's values beyond the test's own; whether the operator runs the chart's leader
    # election (HandoverCluster).
    chart_values: dict[str, str] = {}  # noqa: RUF012 (read only)
    election = False

    def __init__(self, kube: Kube, node: ProcessKubelet, workdir: Path, env: dict[str, str]):
        assert kube.plane is not None, "the crash sample runs on the local control plane"
        self.kube, self.plane, self.node, self.workdir = kube, kube.plane, node, workdir
        self.node.base_env.update(env)  # the stand-in's settings, for the pods of this life
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_starts = 0
        self.proxy = ApiCrashProxy(self.plane.server, self.plane.ca)
        self.release: Release | None = None
        self.namespace = ""
        self._logs: list[Path] = []

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> PlaneCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.release = install_chart(
            self.kube,
            f"crash-{uuid.uuid4().hex[:6]}",
            "crash",
            strings=UNSCHEDULABLE,
            settings=self.chart_values,
        )
        self.namespace = self.release.watched
        self.proxy.start()
        self.argv, self.env = operator_command(self.kube, self.release, self.election)
        self.kubeconfig = token_kubeconfig(self.kube, self.release, self.workdir, self.proxy.url)
        return self

    def stop(self) -> None:
        self._stop_operator()
        self.proxy.stop()
        if self.release is not None:
            self.kube.kubectl(
                "delete",
                "namespace",
                "--wait=false",
                self.namespace,
                self.release.namespace,
                check=False,
            )

    def set_crashes(self, switch: CrashSwitch) -> None:
        self.proxy.crashes = switch

    # ---- the operator -------------------------------------------------------------------------

    def start_operator(self) -> subprocess.Popen[bytes]:
        log = self.workdir / f"operator-{len(self._logs)}.log"
        self._logs.append(log)
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        with log.open("wb") as out:
            self.operator = subprocess.Popen(
                [sys.executable, "-m", "elmforest", *self.argv],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.operator_starts += 1
        return self.operator

    def kill_operator(self) -> None:
        if self.operator is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.operator.pid, signal.SIGKILL)

    def operator_alive(self) -> bool:
        return self.operator is not None and self.operator.poll() is None

    def _stop_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            os.killpg(self.operator.pid, signal.SIGKILL)
            self.operator.wait(10)

    def operator_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-20000:] for p in self._logs)

    # ---- what Kubernetes itself recorded ------------------------------------------------------

    def jobs_created(self) -> dict[str, int]:
        return {name: n for (plural, name), n in self.proxy.created.items() if plural == "jobs"}

    def job_runs(self, job: str) -> int:
        """Pods of ``job`` this life's node started (a Job's pods are ``<job>-<5 chars>``)."""
        prefix = f"{self.namespace}/{job}-"
        return sum(
            1 for p in self.node.started_pods if p.startswith(prefix) and len(p) == len(prefix) + 5
        )

    def unpermitted_requests(self) -> list[tuple[str, str, str]]:
        """The operator's requests the API server refused (403), from its audit log."""
        assert self.release is not None
        user = f"system:serviceaccount:{self.release.namespace}:{self.release.account}"
        refused = set()
        for record in self.plane.audit_records():
            if record.get("user", {}).get("username") != user:
                continue
            if record.get("responseStatus", {}).get("code") == 403:
                ref = record.get("objectRef", {})
                refused.add((ref.get("apiGroup", ""), ref.get("resource", ""), record["verb"]))
        return sorted(refused)

    # ---- a tiny kubectl, as the admin ---------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, ctype: str = "") -> Any:
        data = None if body is None else json.dumps(body).encode()
        try:
            answer = self.plane.request(method, path, data, ctype or "application/json")
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode(errors="replace")) from None
        return json.loads(answer or b"null")

    def _path(self, kind: str) -> str:
        return PATHS[kind].format(ns=self.namespace)

    def create(self, body: dict[str, Any]) -> Any:
        if body["kind"] == "ElmForest":  # its Jobs (training and prepare) go to the stand-in's
            for step in ("trainer", "prepare"):
                placed = body["spec"].setdefault(step, {})
                placed["nodeSelector"] = {"kubernetes.io/hostname": self.node.name}
                placed["tolerations"] = [{**STANDIN_TAINT, "operator": "Equal"}]
        return self._request("POST", self._path(body["kind"]), body)

    def get(self, kind: str, name: str) -> Any:
        return self._request("GET", f"{self._path(kind)}/{name}")

    def list(self, kind: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._request("GET", self._path(kind))["items"]
        return items

    def patch(self, kind: str, name: str, patch: Any) -> Any:
        path = f"{self._path(kind)}/{name}"
        return self._request("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, kind: str, name: str) -> Any:
        return self._request("DELETE", f"{self._path(kind)}/{name}")

    def secret(self, name: str, data: dict[str, str]) -> Any:
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
        return self._request("POST", self._path("Secret"), {**body, "stringData": data})


class HandoverCluster(PlaneCluster):
    """Two operators behind the chart's Lease, as its two replicas: only the leader writes, so
    a crash at a write kills the leader; the standby takes the Lease once it expires (short
    times here: 4 s lease, 3 s renew deadline, 1 s retry) and goes on, and a new standby starts
    in place of the dead one (as the Deployment would restart its pod)."""

    chart_values = {  # noqa: RUF012 (read only)
        "leaderElection.leaseDurationSeconds": "4",
        "leaderElection.renewDeadlineSeconds": "3",
        "leaderElection.retryPeriodSeconds": "1",
    }
    election = True
    REPLICAS = 2

    def __init__(self, kube: Kube, node: ProcessKubelet, workdir: Path, env: dict[str, str]):
        super().__init__(kube, node, workdir, env)
        self.replicas: dict[str, subprocess.Popen[bytes]] = {}  # by identity (its pod name)
        self.killed_leaders: list[str] = []

    def start_operator(self) -> subprocess.Popen[bytes]:
        """Start replicas until two are alive; returns the last one started."""
        self.replicas = {k: p for k, p in self.replicas.items() if p.poll() is None}
        while len(self.replicas) < self.REPLICAS:
            identity = f"replica-{self.operator_starts}"
            self.env = {
                **self.env,
                "POD_NAME": identity,  # the chart's downward API values
                "POD_NAMESPACE": self.release.namespace if self.release else "",
            }
            self.replicas[identity] = super().start_operator()
        assert self.operator is not None
        return self.operator

    def holder(self) -> str | None:
        assert self.release is not None
        lease = self._request(
            "GET",
            f"/apis/coordination.k8s.io/v1/namespaces/{self.release.namespace}/leases/"
            f"{self.release.account}",
        )
        holder = (lease.get("spec") or {}).get("holderIdentity")
        return str(holder) if holder else None

    def kill_operator(self) -> None:
        """The leader: the one that holds the Lease (the only one that writes)."""
        try:
            leader = self.holder()
        except ApiError:
            leader = None
        victims = [leader] if leader in self.replicas else list(self.replicas)
        for identity in victims:
            self.killed_leaders.append(str(identity))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.replicas[str(identity)].pid, signal.SIGKILL)

    def operator_alive(self) -> bool:
        return sum(p.poll() is None for p in self.replicas.values()) == self.REPLICAS

    def _stop_operator(self) -> None:
        for process in self.replicas.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def standin_node(kube: Kube, folder: Path) -> ProcessKubelet:
    """The node the stand-in trainer's pods run on, tainted for them alone."""
    assert kube.plane is not None
    return start_node(
        kube.plane,
        kube,
        folder,
        "node-standin",
        programs={**PROGRAMS, "elmtrain": STANDIN},
        taints=[STANDIN_TAINT],
    )


def cluster_factory(
    kube: Kube, node: ProcessKubelet, kind: type[PlaneCluster] = PlaneCluster
) -> Callable[[Path, dict[str, str]], PlaneCluster]:
    return lambda workdir, env: kind(kube, node, workdir, env)


@contextlib.contextmanager
def plane_clusters(folder: Path) -> Iterator[Callable[[Path, dict[str, str]], PlaneCluster]]:
    """A control plane built from source and the stand-in's node, for the sweep's ``--plane``."""
    from tests.harness import kubebuild

    plane = ControlPlane(folder / "control-plane")
    node: ProcessKubelet | None = None
    try:
        plane.start()
        kube = Kube(
            plane.kubeconfig, kubebuild.tool("kubectl"), kubebuild.tool("helm"), folder, plane
        )
        node = standin_node(kube, folder / "node-standin")
        yield cluster_factory(kube, node)
    finally:
        if node is not None:
            node.stop()
        plane.stop()

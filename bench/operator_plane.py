"""bench.operator on a real control plane (``--control-plane``): kube-apiserver and etcd built
from source (tests/harness/controlplane.py), no controller manager or scheduler, so the operator
under test is the API server's only writer while it is measured and the API server's own
``apiserver_request_total`` counts its requests. Each operator runs as a ServiceAccount bound
to cluster-admin (its rights are not what is measured), with a TokenRequest token.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from tests.harness import kubebuild
from tests.harness.controlplane import ControlPlane, kubeconfig

from bench.common import ROOT

NAMESPACE = "team-a"
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION"}
PATHS = {
    "ElmForest": "/apis/btm.elmforest.io/v1alpha1/namespaces/{ns}/elmforests",
    "ElmBranch": "/apis/btm.elmforest.io/v1alpha1/namespaces/{ns}/elmbranches",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
}


class PlaneCluster:
    """What bench.operator needs of a cluster (create, count Jobs, count writes), for real."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.plane = ControlPlane(work / "plane").start(controllers=False)
        kubectl = str(kubebuild.tool("kubectl"))
        self._kubectl = [kubectl, f"--kubeconfig={self.plane.kubeconfig}"]
        self.run("apply", "--server-side", "-f", str(ROOT / "crds"))
        self.run("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        self.run("create", "namespace", NAMESPACE)
        self.run("create", "serviceaccount", "operator", "-n", NAMESPACE)
        self.run("create", "clusterrolebinding", "bench-operator", "--clusterrole=cluster-admin",
                 f"--serviceaccount={NAMESPACE}:operator")  # fmt: skip
        token = self.run("create", "token", "operator", "-n", NAMESPACE, "--duration=2h").strip()
        self._kubeconfig = work / "operator.kubeconfig"
        self._kubeconfig.write_text(kubeconfig(self.plane.server, self.plane.ca, {"token": token}))
        self.operator: subprocess.Popen[bytes] | None = None

    def run(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run([*self._kubectl, *args], input=stdin, capture_output=True,
                              text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr[-2000:]}")
        return done.stdout

    def kubeconfig(self) -> Path:
        return self._kubeconfig

    def create(self, body: dict[str, Any], namespace: str = NAMESPACE) -> Any:
        path = PATHS[body["kind"]].format(ns=namespace)
        self.run("create", "--raw", path, "-f", "-", stdin=json.dumps(body))

    def create_many(self, bodies: list[dict[str, Any]]) -> None:
        """Many objects at once (8 clients), before the operator starts."""
        from kubernetes import client, config

        api = client.CustomObjectsApi(config.new_client_from_config(str(self.plane.kubeconfig)))
        kind = bodies[0]["kind"]
        plural = PATHS[kind].rsplit("/", 1)[-1]

        def create(body: dict[str, Any]) -> None:
            api.create_namespaced_custom_object("btm.elmforest.io", "v1alpha1", NAMESPACE,
                                                plural, body)  # fmt: skip

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, bodies))

    def secret(self, name: str, data: dict[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                "stringData": data}  # fmt: skip
        self.create(body)

    def jobs(self) -> int:
        listed = json.loads(self.plane.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"))
        return len(listed["items"])

    def request_counts(self) -> dict[tuple[str, str], float]:
        """apiserver_request_total by (resource[/subresource], verb), as the API server counts."""
        counts: dict[tuple[str, str], float] = {}
        text = self.plane.get("/metrics", timeout=30).decode()
        for family in text_string_to_metric_families(text):
            if family.name != "apiserver_request":
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                labels = sample.labels
                resource = labels.get("resource", "") + (
                    f"/{labels['subresource']}" if labels.get("subresource") else ""
                )
                key = (resource, labels.get("verb", ""))
                counts[key] = counts.get(key, 0.0) + sample.value
        return counts

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            self.operator = subprocess.Popen(
                argv, env={**env, "KUBECONFIG": str(self._kubeconfig)}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self.operator

    def stop(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.terminate()
            try:
                self.operator.wait(30)
            except subprocess.TimeoutExpired:
                self.operator.kill()
        self.plane.stop()


def writes_between(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[str, int]:
    """The write requests counted between two scrapes, by 'resource verb'."""
    out = {}
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        # Leases are the API server's own heartbeat (it is running, not the operator).
        if key[1] in WRITE_VERBS and delta > 0 and key[0] != "leases":
            out[f"{key[0]} {key[1].lower()}"] = int(delta)
    return dict(sorted(out.items()))


def elmforest_argv(resync: float) -> list[str]:
    return [sys.executable, "-m", "elmforest", "operator", "--namespace", NAMESPACE,
            "--resync", str(resync), "--liveness", "", "--metrics-port", "0"]  # fmt: skip

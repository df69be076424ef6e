"""Kueue for real: built from its module (tests/cluster/kueue), installed from its own kustomize
manifests (``config/default``, rendered by the built kubectl), its manager run beside the
control plane.

What differs from ``kubectl apply --server-side -k config/default`` on a cluster, and why:

- The manager runs as a process here, not as the Deployment's pod (the rendered Deployment is
  left out): it binds fixed ports and writes inside its image (``/visibility``), which a process
  on a shared machine cannot. Its configuration is the manifests' ConfigMap with free ports, one
  replica without leader election, and the webhook certificates in a temporary folder.
- It runs as its ServiceAccount (a TokenRequest token): the manifests' RBAC is all it gets.
- There is no kube-proxy: the API server reaches the webhook Service at its endpoints
  (``--enable-aggregator-routing``), and this harness writes the EndpointSlice that the
  EndpointSlice controller writes for the pod: this machine's own non-loopback address (the API
  server refuses loopback endpoints) and the manager's webhook port.
- The kubelet's secret volume: the certificate that Kueue's rotator writes into its Secret is
  copied into the manager's certificate folder, as a kubelet syncs a mounted Secret.
- The on-demand visibility API (an aggregated API server that writes its certificates under
  ``/visibility``) is switched off and its APIServices are not installed.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.harness import kubebuild
from tests.harness.controlplane import free_port, host_address, kubeconfig
from tests.harness.kubectl import Kube, wait_for

NAMESPACE = "kueue-system"
ACCOUNT = "kueue-controller-manager"
WEBHOOK_SERVICE = "kueue-webhook-service"
CERT_SECRET = "kueue-webhook-server-cert"
CONFIG_KEY = "controller_manager_config.yaml"
LEFT_OUT = frozenset({"Deployment", "APIService"})  # the pod runs as a process; no visibility API
WEBHOOK_CONFIGURATIONS = (
    "mutatingwebhookconfiguration/kueue-mutating-webhook-configuration",
    "validatingwebhookconfiguration/kueue-validating-webhook-configuration",
)


def manifests(kube: Kube) -> list[dict[str, Any]]:
    """Kueue's own install, as ``kubectl kustomize config/default`` renders it."""
    source = kubebuild.source_of(kubebuild.KUEUE, "sigs.k8s.io/kueue")
    rendered = kube.kubectl("kustomize", str(source / "config" / "default")).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@dataclass
class KueueManager:
    """Kueue installed on the cluster of ``kube`` (a local control plane) and its manager."""

    kube: Kube
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    webhook_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.folder / "kueue.log"

    @property
    def certs(self) -> Path:
        return self.folder / "serving-certs"

    def start(self, timeout: float = 180) -> KueueManager:
        binary = kubebuild.build(kubebuild.KUEUE)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.certs.mkdir(exist_ok=True)
        docs = [self._configured(d) for d in manifests(self.kube) if d["kind"] not in LEFT_OUT]
        self.kube.apply(docs)
        self.kube.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "-l",
            "app.kubernetes.io/name=kueue",
        )
        self.kube.apply(self._endpoints())
        config_file = self.folder / "config.yaml"
        config_map = next(d for d in docs if d["kind"] == "ConfigMap")
        config_file.write_text(config_map["data"][CONFIG_KEY])
        self._watch_secret()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    f"--config={config_file}",
                    "--feature-gates=VisibilityOnDemand=false",
                    "--zap-log-level=2",
                ],
                env={**os.environ, "KUBECONFIG": str(self._account_kubeconfig())},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for("Kueue's manager ready", self._ready, timeout=timeout, alive=self.exited)
        return self

    def stop(self) -> None:
        """Webhooks first (their failurePolicy is Fail: without a manager they refuse pods)."""
        for name in WEBHOOK_CONFIGURATIONS:
            self.kube.kubectl("delete", name, "--ignore-not-found", check=False)
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        for thread in self._threads:
            thread.join(5)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    # ---- install ------------------------------------------------------------------------------

    def _configured(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The manifests' ConfigMap with this machine's ports and folders; the rest as is."""
        if doc["kind"] != "ConfigMap" or CONFIG_KEY not in doc.get("data", {}):
            return doc
        settings = yaml.safe_load(doc["data"][CONFIG_KEY])
        settings["health"]["healthProbeBindAddress"] = f"127.0.0.1:{self.health_port}"
        # Off: with certificates not managed by cert-manager it serves from /etc/kueue/metrics.
        settings["metrics"]["bindAddress"] = "0"
        settings["webhook"] = {"port": self.webhook_port, "certDir": str(self.certs)}
        settings["leaderElection"]["leaderElect"] = False  # one replica
        doc["data"][CONFIG_KEY] = yaml.safe_dump(settings, sort_keys=False)
        return doc

    def _endpoints(self) -> dict[str, Any]:
        """What the EndpointSlice controller writes for a ready manager pod, at this machine."""
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{WEBHOOK_SERVICE}-process",
                "namespace": NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": WEBHOOK_SERVICE,
                    "endpointslice.kubernetes.io/managed-by": "elmforest-tests",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "", "port": self.webhook_port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [host_address()], "conditions": {"ready": True}}],
        }

    def _account_kubeconfig(self) -> Path:
        plane = self.kube.plane
        assert plane is not None, "Kueue's manager runs beside a local control plane only"
        token = self.kube.kubectl(
            "create", "token", ACCOUNT, "-n", NAMESPACE, "--duration=24h"
        ).stdout.strip()
        path = self.folder / "kueue.kubeconfig"
        path.write_text(kubeconfig(plane.server, plane.ca, {"token": token}))
        return path

    # ---- the kubelet's part: the Secret's files in the certificate folder ---------------------

    def _watch_secret(self) -> None:
        api = client.CoreV1Api(config.new_client_from_config(str(self.kube.kubeconfig)))

        def sync() -> None:
            written: dict[str, bytes] = {}
            while not self._stop.wait(0.5):
                try:
                    data = api.read_namespaced_secret(CERT_SECRET, NAMESPACE).data or {}
                except (ApiException, OSError):
                    continue
                for key, value in data.items():
                    content = base64.b64decode(value)
                    if written.get(key) != content:
                        partial = self.certs / f".{key}.partial"
                        partial.write_bytes(content)
                        partial.rename(self.certs / key)  # whole files only, as a volume swap
                        written[key] = content

        thread = threading.Thread(target=sync, name="kueue-secret-volume", daemon=True)
        thread.start()
        self._threads.append(thread)

    # ---- health -------------------------------------------------------------------------------

    def _ready(self) -> bool:
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        return False

    def exited(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"Kueue's manager exited {self.process.returncode}:\n{self.log_tail()}"
        return None

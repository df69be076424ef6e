"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller manager, scheduler.

Built from the pinned Go module (``tests.harness.kubebuild``) and started as plain processes,
the way kubeadm lays out a control-plane node: its own CA, a client certificate per component,
``--authorization-mode=Node,RBAC``, service-account token signing (TokenRequest works), the
default admission plugins (PodSecurity among them), and an audit log of what each identity
asked (how the tests prove RBAC is least privilege). No kubelet: pods are admitted, scheduled
nowhere, and stay Pending.

By hand: ``make cluster-up`` (``python -m tests.harness.controlplane up``) writes
``.cluster/kubeconfig`` and links ``.cluster/bin/kubectl``, ``helm`` ...; ``make cluster-down``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness import kubebuild, pki

SERVICE_RANGE = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# Every request from the identities under test, at Metadata level; the control plane's own
# components and the nodes are left out so the log stays small.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {
            "level": "None",
            "users": [
                "system:kube-controller-manager",
                "system:kube-scheduler",
                "system:apiserver",
            ],
        },
        {"level": "None", "userGroups": ["system:nodes"]},
        {"level": "None", "nonResourceURLs": ["/healthz*", "/readyz*", "/livez*", "/version"]},
        {"level": "Metadata"},
    ],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def host_address() -> str:
    """This machine's first non-loopback IPv4 address: where an endpoint may point (the API
    server refuses loopback endpoints), e.g. for a webhook or a Service's pods."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(
                    sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                )
            except OSError:  # no IPv4 address on this interface
                continue
        address = ipaddress.ip_address(socket.inet_ntoa(packed[20:24]))
        if not (address.is_loopback or address.is_link_local or address.is_unspecified):
            return str(address)
    raise RuntimeError("no non-loopback IPv4 address here: no endpoint can point at this machine")


def kubeconfig(server: str, ca: Path, user: dict[str, str], name: str = "elmforest-test") -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": name, "cluster": {"server": server, "certificate-authority": str(ca)}}
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": "user"}}],
            "current-context": name,
        }
    )


@dataclass
class ControlPlane:
    """The processes of one control plane, all under ``folder`` (certs, data, logs, kubeconfig)."""

    folder: Path
    server: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    _ca: pki.Authority = field(init=False, repr=False)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.folder / "audit.log"

    def audit_records(self) -> list[dict[str, Any]]:
        """The audit log's complete records, oldest first.

        The API server appends to the log while a test reads it, so the last line may be half
        written: only lines that end in a newline are records yet.
        """
        text = self.audit_log.read_text()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line]

    @property
    def ca(self) -> Path:
        return self.folder / "pki" / "ca.crt"

    def _start(self, name: str, argv: list[str]) -> None:
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(
                [str(kubebuild.tool(name)), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives `make cluster-up`, and is killed as a group
            )
        self._processes.append(process)
        self.pids[name] = process.pid

    def start(self, timeout: float = 180, controllers: bool = True) -> ControlPlane:
        """Start etcd and the API server, then (``controllers``) the controller manager and the
        scheduler; without them the API server's clients are the only writers (benchmarks).
        A failed start stops what it had started (no orphan etcd holding ports and data)."""
        try:
            return self._start_all(timeout, controllers)
        except BaseException:
            self.stop()
            raise

    def _start_all(self, timeout: float, controllers: bool) -> ControlPlane:
        self.folder.mkdir(parents=True, exist_ok=True)
        ca = self._ca = pki.Authority(self.folder / "pki")
        serving = ca.issue("apiserver", "kube-apiserver", serving=True)
        admin = ca.issue("admin", "elmforest-admin", "system:masters")
        sa = pki.service_account_keys(self.folder / "pki")
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd = f"http://127.0.0.1:{etcd_port}"
        self._start(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.folder / 'etcd'}",
                f"--listen-client-urls={etcd}",
                f"--advertise-client-urls={etcd}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",  # a test cluster: durability across power loss is not tested
                "--log-level=warn",
            ],
        )
        policy = self.folder / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self._start(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # it refuses a loopback address; no pod needs it
                # No kube-proxy: webhook and aggregated-API Services are reached at their
                # endpoints, not at a cluster IP nothing routes (Kueue's webhooks need this).
                "--enable-aggregator-routing=true",
                f"--secure-port={api_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--allow-privileged=true",  # as kubeadm: Pod Security decides
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking",
                "--audit-log-format=json",
            ],
        )
        self.server = f"https://127.0.0.1:{api_port}"
        self.kubeconfig.write_text(
            kubeconfig(
                self.server,
                ca.cert,
                {"client-certificate": str(admin.cert), "client-key": str(admin.key)},
            )
        )
        components = (
            ("kube-controller-manager", "system:kube-controller-manager"),
            ("kube-scheduler", "system:kube-scheduler"),
        )
        self._waited_for_apiserver(timeout, admin)
        for name, identity in components if controllers else ():
            config = self._identity(name, identity)
            argv = [
                f"--kubeconfig={config}",
                f"--authentication-kubeconfig={config}",
                f"--authorization-kubeconfig={config}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
            ]
            if name == "kube-controller-manager":
                argv += [
                    "--use-service-account-credentials",
                    f"--service-account-private-key-file={sa.key}",
                    f"--root-ca-file={ca.cert}",
                    f"--service-cluster-ip-range={SERVICE_RANGE}",
                ]
            self._start(name, argv)
        if controllers:  # the default service account comes from the controller manager
            self._wait_ready(timeout)
        (self.folder / "state.json").write_text(
            json.dumps({"server": self.server, "pids": self.pids})
        )
        return self

    def node_kubeconfig(self, node: str) -> Path:
        """A kubeconfig as the kubelet of ``node`` (``system:node:<node>`` in ``system:nodes``),
        so the Node authorizer grants it what a kubelet gets, no more."""
        return self._identity(f"node-{node}", f"system:node:{node}", "system:nodes")

    def _identity(self, stem: str, user: str, group: str | None = None) -> Path:
        """A kubeconfig with a client certificate from this plane's CA for ``user``."""
        pair = self._ca.issue(stem, user, group)
        path = self.folder / f"{stem}.kubeconfig"
        cert = {"client-certificate": str(pair.cert), "client-key": str(pair.key)}
        path.write_text(kubeconfig(self.server, self.ca, cert))
        return path

    def _context(self, admin: pki.Pair | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        pair = admin or pki.Pair(
            self.folder / "pki" / "admin.crt", self.folder / "pki" / "admin.key"
        )
        context.load_cert_chain(str(pair.cert), str(pair.key))
        return context

    def get(self, path: str, timeout: float = 10) -> bytes:
        """A GET as the admin (for /readyz, /metrics and the like)."""
        return self.request("GET", path, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 10,
    ) -> bytes:
        """A request as the admin; an error status raises ``urllib.error.HTTPError``."""
        request = urllib.request.Request(self.server + path, data=body, method=method)
        request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, context=self._context(), timeout=timeout) as answer:
            data: bytes = answer.read()
            return data

    def _waited_for_apiserver(self, timeout: float, admin: pki.Pair) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                if self.get("/readyz") == b"ok":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"kube-apiserver not ready in {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _wait_ready(self, timeout: float) -> None:
        """Ready for tests: the default namespace has the service account pods are admitted with."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                self.get("/api/v1/namespaces/default/serviceaccounts/default")
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the control plane not ready in {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _check_alive(self) -> None:
        for process in self._processes:
            if process.poll() is not None:
                name = next(n for n, p in self.pids.items() if p == process.pid)
                raise RuntimeError(f"{name} exited {process.returncode}\n{self.log_tail(name)}")

    def log_tail(self, name: str | None = None, chars: int = 4000) -> str:
        names = [name] if name else list(self.pids)
        parts = []
        for each in names:
            path = self.folder / "logs" / f"{each}.log"
            if path.is_file():
                parts.append(f"--- {each}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        stop_pids(list(self.pids.values())[::-1])
        self.pids.clear()
        self._processes.clear()


def stop_pids(pids: list[int], grace: float = 10) -> None:
    """SIGTERM each process group, newest first, then SIGKILL what is left after ``grace``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (cluster-down): ask the kernel instead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return finished == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.controlplane")
    parser.add_argument("command", choices=("up", "down", "build"))
    parser.add_argument("--dir", type=Path, default=kubebuild.ROOT / ".cluster")
    args = parser.parse_args(argv)
    folder: Path = args.dir.absolute()
    if args.command == "build":
        print(kubebuild.binary())
        return 0
    state = folder / "state.json"
    if state.is_file():
        stop_pids(list(json.loads(state.read_text())["pids"].values())[::-1])
        state.unlink()
    if args.command == "down":
        print(f"stopped the control plane in {folder}")
        return 0
    for name in ("etcd", "logs", "pki", "audit.log"):  # a fresh cluster each time
        path = folder / name
        if path.is_dir():
            subprocess.run(["rm", "-rf", str(path)], check=True)
        elif path.exists():
            path.unlink()
    kubebuild.binary()
    plane = ControlPlane(folder).start()
    bin_folder = folder / "bin"
    bin_folder.mkdir(exist_ok=True)
    for name in kubebuild.COMPONENTS:
        link = bin_folder / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(kubebuild.tool(name))
    print(f"control plane {kubebuild.KUBERNETES_VERSION} at {plane.server}")
    print(f"  export KUBECONFIG={plane.kubeconfig} PATH={bin_folder}:$PATH")
    print(f"  logs: {folder / 'logs'}; stop: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())

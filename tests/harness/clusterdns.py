"""Cluster DNS and a pod network for the process nodes, as a cluster has them.

DNS is CoreDNS, built from its pinned Go module (tests/cluster/coredns, like the control plane:
``kubebuild.COREDNS``) with its ``kubernetes`` plugin watching the suite's API server, so a
headless Service's ``<hostname>.<service>.<namespace>.svc`` answers with the pod's address from
the EndpointSlices that Kubernetes' own controller writes. It listens on port 53 of an address
of its own (a resolv.conf can name no other port), as a cluster's DNS Service has one.

The pod network: each pod gets an address of its own, added to the loopback interface as a CNI
plugin adds one to a pod's interface (routable from every pod on this machine, refused by no
EndpointSlice as loopback addresses are), and is told the DNS by a resolv.conf of its own
(nodeagent.py runs the pod in its own mount and UTS namespaces, with its host name).
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), as a node does.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import kubebuild
from tests.harness.controlplane import stop_pids

CLUSTER_DOMAIN = "cluster.local"
# Far from the suite's Service range (10.0.0.0/24) and from this machine's own networks.
POD_NETWORK = "10.244"


def _loopback_addresses() -> set[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def claim_address() -> str:
    """A new address on the loopback interface, in the pod network, that no one holds."""
    taken = _loopback_addresses()
    for _ in range(1000):
        address = f"{POD_NETWORK}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        if address in taken:
            continue
        add = ["ip", "addr", "add", f"{address}/32", "dev", "lo"]
        added = subprocess.run(add, check=False, capture_output=True, text=True)
        if added.returncode == 0:
            return address
        if "exists" not in added.stderr:
            raise RuntimeError(f"ip addr add {address}: {added.stderr.strip()} (needs root)")
    raise RuntimeError("no free address in the pod network")


def release_address(address: str) -> None:
    remove = ["ip", "addr", "del", f"{address}/32", "dev", "lo"]
    subprocess.run(remove, check=False, capture_output=True)  # gone already: nothing to do


def resolv_conf(nameserver: str, namespace: str) -> str:
    """What a kubelet writes for a ClusterFirst pod: the cluster DNS, the namespace's search
    path first, ndots 5."""
    search = f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    return f"nameserver {nameserver}\nsearch {search}\noptions ndots:5\n"


def hosts_file(address: str, hostname: str, subdomain: str | None, namespace: str) -> str:
    """A kubelet's /etc/hosts: the pod's own name (fully qualified under its subdomain)."""
    names = [hostname]
    if subdomain:
        names.insert(0, f"{hostname}.{subdomain}.{namespace}.svc.{CLUSTER_DOMAIN}")
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{address}\t{' '.join(names)}\n"


def query(server: str, name: str, timeout: float = 1.0) -> tuple[int, list[str]]:
    """One A query to ``server``:53: (rcode, addresses). Enough DNS to wait for CoreDNS."""
    header = struct.pack(">HHHHHH", random.randint(0, 65535), 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    packet = header + labels + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        answer, _ = sock.recvfrom(4096)
    rcode, count = answer[3] & 0x0F, struct.unpack(">H", answer[6:8])[0]
    offset = len(packet)  # the question is echoed; the answers follow
    addresses = []
    for _ in range(count):
        offset += 2 if answer[offset] & 0xC0 == 0xC0 else answer.index(b"\0", offset) + 1 - offset
        kind, _, _, length = struct.unpack(">HHIH", answer[offset : offset + 10])
        offset += 10
        if kind == 1 and length == 4:
            addresses.append(socket.inet_ntoa(answer[offset : offset + 4]))
        offset += length
    return rcode, addresses


@dataclass
class ClusterDNS:
    """CoreDNS for one control plane, reading it with ``kubeconfig`` (the plane's admin: a
    cluster gives CoreDNS a read-only role; what it reads is the same)."""

    folder: Path
    kubeconfig: Path
    address: str = ""
    pid: int | None = None
    _owned: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60) -> ClusterDNS:
        binary = kubebuild.build(kubebuild.COREDNS)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.address = claim_address()
        self._owned.append(self.address)
        corefile = self.folder / "Corefile"
        corefile.write_text(
            f".:53 {{\n    bind {self.address}\n    errors\n"
            # The zones of a cluster's Corefile: its names and the reverse ones of its pods.
            f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
            f"        kubeconfig {self.kubeconfig}\n    }}\n}}\n"
        )
        with (self.folder / "coredns.log").open("ab") as out:
            process = subprocess.Popen(
                [str(binary), "-conf", str(corefile)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = process.pid
        deadline = time.monotonic() + timeout
        while True:  # answering (after the plugin's first sync of Services and slices)
            with contextlib.suppress(OSError):
                rcode, _ = query(self.address, f"kubernetes.default.svc.{CLUSTER_DOMAIN}")
                if rcode in (0, 3):
                    return self
            if process.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "coredns.log").read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"CoreDNS did not answer on {self.address}:53\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.pid is not None:
            stop_pids([self.pid])
            self.pid = None
        for address in self._owned:
            release_address(address)
        self._owned.clear()

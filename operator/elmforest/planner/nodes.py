"""One branch on many nodes, planned purely: an Indexed Job of ``spec.trainer.nodes`` pods
behind a headless Service, whose torchrun agents rendezvous (c10d) at index 0.

The Job controller names each pod's host ``<job>-<index>``; with the pod's ``subdomain`` set to
the Service, the cluster's DNS answers ``<job>-0.<service>.<namespace>.svc`` with index 0's
address, which is where the agents meet (the agent whose address that is hosts the store). The
name is left relative to the cluster domain, so the pod's DNS search path completes it on any
cluster (``cluster.local`` or not).

The Job is a gang (docs/operations.md, "Many nodes for one branch"), restarted by the Job
controller, not by torchrun: torchrun never restarts workers in place (``--max-restarts=0``,
so bad input, exit 65, stays final), the ranks agree on stopping at every step, so a SIGTERM
on one pod checkpoints and exits every pod (75); each failed index is recreated (an evicted
one without counting), and the new pods rendezvous again and resume from that checkpoint. The
backoff limit counts every pod's failures, so it is scaled by the number of nodes.
"""

from __future__ import annotations

from typing import Any

from elmforest.planner.naming import MAX_NAME, child_name, digest

RENDEZVOUS_PORT = 29400  # torchrun's default c10d port
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"  # set by the Job controller on each pod


def label_safe(name: str) -> str:
    """A DNS-1035 label's start of an object name (a DNS-1123 subdomain may have dots and a
    leading digit; host names and Service names may not). A name that had to change carries a
    hash of itself, so that branches "a.b" and "a-b" never share a Job or a Service."""
    if "." not in name and name[:1].isalpha():
        return name
    safe = name.replace(".", "-")
    return f"{safe if safe[:1].isalpha() else 'n' + safe}-{digest(name, 6)}"


def node_job_name(branch: str, version: int, attempt: int, nodes: int) -> str:
    """The Job's name, short enough that ``<job>-<index>`` is still a host name."""
    return child_name(label_safe(branch), f"v{version}-a{attempt}", MAX_NAME - len(f"-{nodes - 1}"))


def node_service_name(branch: str) -> str:
    """One headless Service per branch: each attempt's pods register under it."""
    return child_name(label_safe(branch), "nodes")


def rendezvous_command(job: str, service: str, namespace: str, nodes: int, gpus: int) -> list[str]:
    """torchrun on every pod: ``gpus`` processes each (one on a CPU node, gloo), ranks assigned
    by the rendezvous at index 0 (whose rank 0 writes the run's progress and result)."""
    return [
        "elmtrain-torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={max(gpus, 1)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={job}-0.{service}.{namespace}.svc:{RENDEZVOUS_PORT}",
        f"--rdzv-id={job}",
        "--max-restarts=0",
        "-m",
        "elmtrain",
    ]


def one_pod_per_node(labels: dict[str, str]) -> dict[str, Any]:
    """Required anti-affinity among the branch's trainer pods: the nodes of ``trainer.nodes``
    are nodes, even where one node's free GPUs (or CPUs) would hold two pods."""
    term = {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}
    return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}


def headless_service(
    name: str,
    namespace: str,
    labels: dict[str, str],
    selector: dict[str, str],
    owner: dict[str, Any],
) -> dict[str, Any]:
    """The Service whose name is the pods' ``subdomain``; owned by the branch, so the garbage
    collector removes it with the branch."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            # Rendezvous happens before any pod is ready: publish the addresses at once.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }

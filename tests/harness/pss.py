"""Pod Security Standards "restricted" (Kubernetes v1.31 profile) and image-digest checks.

Written from the published profile (kubernetes.io/docs/concepts/security/pod-security-
standards), independently of the code that builds our pods, so the two cannot share a mistake.
Returns every violation as a sentence; an empty list means the pod passes.
"""

from __future__ import annotations

import re
from typing import Any

DIGEST_IMAGE = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
ALLOWED_SECCOMP = {"RuntimeDefault", "Localhost"}


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a Pod, Deployment, Job, StatefulSet, DaemonSet or CronJob."""
    kind = obj.get("kind")
    if kind == "Pod":
        return dict(obj["spec"])
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return dict(obj["spec"]["template"]["spec"])
    if kind == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return None


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    pod_context = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{flag} is set")
    for volume in pod.get("volumes") or []:
        types = set(volume) - {"name"}
        if not types <= ALLOWED_VOLUMES:
            problems.append(f"volume {volume['name']} has a forbidden type {sorted(types)}")
    if pod_context.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    containers = [
        *(pod.get("initContainers") or []),
        *(pod.get("containers") or []),
        *(pod.get("ephemeralContainers") or []),
    ]
    if not containers:
        problems.append("the pod has no containers")
    for container in containers:
        problems += [f"container {container['name']}: {p}" for p in _container(container, pod)]
    return problems


def _container(container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    context = container.get("securityContext") or {}
    pod_context = pod.get("securityContext") or {}
    if context.get("privileged"):
        problems.append("privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append("capabilities do not drop ALL")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append(f"adds capabilities {capabilities['add']}")
    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        problems.append("runAsNonRoot is not true")
    if context.get("runAsUser") == 0:
        problems.append("runAsUser is 0")
    seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in ALLOWED_SECCOMP:
        problems.append(f"seccompProfile is {seccomp!r}, not RuntimeDefault or Localhost")
    if any(port.get("hostPort") for port in container.get("ports") or []):
        problems.append("uses a hostPort")
    image = str(container.get("image", ""))
    if not DIGEST_IMAGE.fullmatch(image):
        problems.append(f"image {image!r} is not pinned by digest (name@sha256:<64 hex>)")
    return problems

"""A pod's container as a ``podman run``: what a kubelet with a container runtime makes of it.

It takes the pod spec as the API serves it (camelCase, what the planners render) and honours
what elmforest's pods ask of a runtime: the pod's and the container's ``securityContext``
(user and group, non-root, read-only root, capabilities, privilege escalation, seccomp,
fsGroup), ``env`` (values resolved by the caller, as a kubelet reads Secrets), volumes
(``emptyDir``, in memory or on disk, owned by fsGroup; a folder the caller made for anything
else), the termination-message file, resource limits, working directory, command and args.
No service-account token is mounted unless the caller gives one. The pod shares this
machine's network, as the process kubelet's pods do without cluster DNS.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

# podman's default ulimits (nofile 1048576, nproc at the host's hard limit) are more than
# runc may set in this VM ("error setting rlimit ... operation not permitted").
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
TERMINATION_LOG = "/dev/termination-log"
# podman's own exits (125: podman failed, e.g. no such image; 126: cannot invoke; 127: no such
# command in the image) and ours for a spec refused before podman ran: a kubelet's StartError.
REFUSED = 125
START_ERRORS = (125, 126, 127)


class PodRefusedError(ValueError):
    """The runtime would not start this container (a kubelet's CreateContainerConfigError)."""


def podman(*args: str) -> list[str]:
    return ["podman", "--runtime", "runc", *args]


def quantity_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|[kMGT]|)", str(value))
    if match is None:
        raise PodRefusedError(f"memory quantity {value!r}")
    scale = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(float(match[1]) * scale[match[2]])


def quantity_cpus(value: str) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def run_command(
    spec: dict[str, Any],
    *,
    name: str,
    env: dict[str, str],
    folder: Path,
    mounted: dict[str, Path] | None = None,
    detach: bool = False,
) -> list[str]:
    """``podman run`` of ``spec``'s first container; ``folder`` holds its volumes and
    termination log; ``mounted``: mountPath -> a folder the caller filled (Secrets)."""
    container = spec["containers"][0]
    security = {**(spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
    uid, gid = security.get("runAsUser"), security.get("runAsGroup")
    if security.get("runAsNonRoot") and uid in (None, 0):
        raise PodRefusedError("runAsNonRoot with no non-root runAsUser")  # as a kubelet checks
    group = security.get("fsGroup", gid)
    args = ["run", "--rm", "--name", name, "--network", "host", "--pull", "never", *ULIMITS]
    args += ["--detach"] if detach else []
    if uid is not None:
        args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if group is not None:
        args += ["--group-add", str(group)]
    if security.get("readOnlyRootFilesystem"):
        # podman would add tmpfs at /tmp, /var/tmp and /run; Kubernetes adds none.
        args += ["--read-only", "--read-only-tmpfs=false"]
    for capability in (security.get("capabilities") or {}).get("drop") or []:
        args += ["--cap-drop", capability]
    for capability in (security.get("capabilities") or {}).get("add") or []:
        args += ["--cap-add", capability]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if (security.get("seccompProfile") or {}).get("type") == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]  # RuntimeDefault: podman's own
    args += _volumes(spec, container, folder, mounted or {}, uid, group)
    termination = folder / "termination-log"
    termination.touch()
    _own(termination, uid, group)
    path = container.get("terminationMessagePath") or TERMINATION_LOG
    args += ["--volume", f"{termination}:{path}:rw"]
    limits = (container.get("resources") or {}).get("limits") or {}
    if "cpu" in limits:
        args += ["--cpus", str(quantity_cpus(limits["cpu"]))]
    if "memory" in limits:
        args += ["--memory", str(quantity_bytes(limits["memory"]))]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    if container.get("workingDir"):
        args += ["--workdir", container["workingDir"]]
    command = list(container.get("command") or [])
    if command:
        args += ["--entrypoint", command[0]]
    return podman(*args, container["image"], *command[1:], *(container.get("args") or []))


def _volumes(
    spec: dict[str, Any],
    container: dict[str, Any],
    folder: Path,
    mounted: dict[str, Path],
    uid: int | None,
    group: int | None,
) -> list[str]:
    by_name = {v["name"]: v for v in spec.get("volumes") or []}
    args: list[str] = []
    for mount in container.get("volumeMounts") or []:
        path, volume = mount["mountPath"], by_name[mount["name"]]
        mode = "ro" if mount.get("readOnly") else "rw"
        if path in mounted:
            args += ["--volume", f"{mounted[path]}:{path}:{mode}"]
        elif "emptyDir" in volume and (volume["emptyDir"] or {}).get("medium") == "Memory":
            args += ["--tmpfs", f"{path}:rw,mode=1777"]  # podman 4.3 takes no uid= here
        elif "emptyDir" in volume:
            host = folder / "volumes" / mount["name"]
            host.mkdir(parents=True, exist_ok=True)
            _own(host, uid, group)
            host.chmod(0o2770)  # the fsGroup's, setgid: what the kubelet makes of an emptyDir
            args += ["--volume", f"{host}:{path}:{mode}"]
        else:
            raise PodRefusedError(f"volume {mount['name']}: emptyDir, or a folder the caller made")
    return args


def _own(path: Path, uid: int | None, group: int | None) -> None:
    if os.geteuid() == 0 and uid is not None:
        os.chown(path, uid, group if group is not None else uid)


def remove(name: str | None) -> None:
    """Stop and remove a container now (SIGKILL'ing ``podman run`` leaves it running)."""
    if name is not None:
        subprocess.run(podman("rm", "--force", "--time", "0", name), capture_output=True,
                       check=False)  # fmt: skip

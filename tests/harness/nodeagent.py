"""A process kubelet: one Node of the real control plane whose pods run as local processes.

It registers a Node (CPU, memory, pods and ``nvidia.com/gpu`` capacity) as
``system:node:<name>`` (the Node authorizer then lets it read only what its own pods use),
renews its Lease, and runs each pod the real scheduler binds to it: the first container's
command and args (an image's entrypoint mapped to this machine's program, ``elmtrain`` to this
venv's), env with ``secretKeyRef``/``configMapKeyRef``/``fieldRef``, every volume as a folder
(paths under a mount are rewritten to it), a service-account token from the TokenRequest API
where the pod mounts one, and the working directory. It reports phase, conditions, container
state, exit code and termination message as a kubelet does, so Kubernetes' own Job controller
counts successes and failures and applies each Job's ``podFailurePolicy``. A container with an
``httpGet`` readiness probe is Ready only while the probe answers (every ``periodSeconds``), so
Kubernetes' EndpointSlice controller puts the pod behind its Service when it can answer; the
pod's IP is ``pod_ip`` (this machine's: all pods share its network, so each listens on its
own port). With ``dns`` (a cluster DNS address, tests/harness/clusterdns.py) each pod is as on a
cluster instead: an address of its own in the pod network, its own mount and UTS namespaces
with the kubelet's resolv.conf (that DNS, the namespace's search path) and /etc/hosts bound in,
and its host name (``spec.hostname``, else its name). A pod being deleted
(the Job controller, garbage collection, or an eviction through the Eviction API, which adds
DisruptionTarget) gets SIGTERM, then SIGKILL after its grace period, and is then released.
In container mode (``containers=True``) a pod whose image was built here (``localhost/...``)
runs in that image by podman instead, as its spec says (tests/harness/podrun.py); a container
podman cannot start is reported terminated with reason StartError, exit 128.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.harness import clusterdns, podrun
from tests.harness.controlplane import kubeconfig

# What an image's entrypoint is on this machine (a container's command word -> argv here).
PROGRAMS = {
    "elmtrain": [sys.executable, "-m", "elmtrain"],
    "elmforest": [sys.executable, "-m", "elmforest"],
    "elmtrain-torchrun": [sys.executable, "-m", "elmtrain.run.launch"],
}
ENTRYPOINTS = {"trainer": ["elmtrain"], "operator": ["elmforest"]}  # image name part -> command
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    folder: Path
    started: str
    termination: Path
    log: Path
    kill_at: float | None = None  # monotonic deadline for SIGKILL once SIGTERM was sent
    ready: bool = True  # as last reported (a readiness probe decides, where there is one)
    probed_at: float = 0.0  # monotonic time of the last readiness probe
    address: str | None = None  # the pod's own, in the pod network (with a cluster DNS)
    container: str | None = None  # container mode: podman's name for it

    @property
    def container_id(self) -> str:
        """``<runtime>://<id>``, as a kubelet reports it."""
        if self.container:
            return f"podman://{self.container}"
        return f"process://{self.process.pid}"


@dataclass
class ProcessKubelet:
    kubeconfig: Path  # the node's own identity (system:node:<name>)
    name: str
    workdir: Path
    server: str  # what in-cluster clients are pointed at (KUBERNETES_SERVICE_HOST/PORT)
    ca: Path
    base_env: dict[str, str] = field(default_factory=dict)
    capacity: dict[str, str] = field(
        default_factory=lambda: {
            "cpu": "16",
            "memory": "64Gi",
            "pods": "110",
            "nvidia.com/gpu": "4",
        }
    )
    poll_seconds: float = 0.3
    pod_ip: str = "127.0.0.1"  # a Service's endpoints need a non-loopback one (host_address)
    programs: dict[str, list[str]] = field(default_factory=lambda: dict(PROGRAMS))
    # An image (by how its reference ends, e.g. its digest) -> the argv its entrypoint runs,
    # before ``programs``: another version of the code (tests/cluster/test_upgrade.py).
    images: dict[str, list[str]] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)  # registered with the Node
    dns: str | None = None  # the cluster DNS: each pod networked and named as on a cluster
    # Container mode: a pod whose image was built here (localhost/...) runs in it, by podman,
    # as its spec says (tests/harness/podrun.py); other pods still run as processes.
    containers: bool = False
    pods: dict[str, Running] = field(default_factory=dict)  # by pod uid
    done: set[str] = field(default_factory=set)  # uids reported terminal
    started_pods: list[str] = field(default_factory=list)  # "namespace/name", in start order
    # "namespace/name" -> (started, exit seen), wall-clock seconds: what ran at the same time
    lifetimes: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.api = client.CoreV1Api(config.new_client_from_config(str(self.kubeconfig)))
        self.leases = client.CoordinationV1Api(self.api.api_client)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        self._register()
        for target in (self._heartbeat, self._sync_loop):
            thread = threading.Thread(target=target, name=f"kubelet-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        for running in self.pods.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGKILL)
            podrun.remove(running.container)
            running.process.wait(10)
            if running.address:
                clusterdns.release_address(running.address)
        self.pods.clear()

    def _register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux"},
            },
            "spec": {"taints": self.taints},
        }
        with contextlib.suppress(ApiException):  # already registered (a restarted agent)
            self.api.create_node(node)
        self._report_node()

    def _report_node(self) -> None:
        now = _now()
        conditions = [
            {
                "type": t,
                "status": "False",
                "reason": f"KubeletHas{r}",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
                "message": "ok",
            }
            for t, r in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "process kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        )
        status = {
            "status": {
                "capacity": self.capacity,
                "allocatable": self.capacity,
                "conditions": conditions,
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.name},
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.37.2",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "process://1",
                    "kernelVersion": "",
                    "osImage": "",
                    "kubeProxyVersion": "",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }
        self.api.patch_node_status(self.name, status)

    def _heartbeat(self) -> None:
        """Renew the Lease every few seconds and post node status now and then, as a kubelet."""
        beats = 0
        while not self._stop.wait(0 if beats == 0 else 5):
            with contextlib.suppress(ApiException, OSError):
                self._renew_lease()
                if beats % 4 == 0:
                    self._report_node()
            beats += 1

    def _renew_lease(self) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body: dict[str, Any] = {
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": now},
        }
        try:
            self.leases.replace_namespaced_lease(
                self.name,
                "kube-node-lease",
                {
                    **body,
                    "metadata": {
                        **body["metadata"],
                        "resourceVersion": self.leases.read_namespaced_lease(
                            self.name, "kube-node-lease"
                        ).metadata.resource_version,
                    },
                },
            )
        except ApiException as error:
            if error.status != 404:
                raise
            self.leases.create_namespaced_lease("kube-node-lease", body)

    def log_of(self, namespace: str, pod: str) -> str:
        """What the pod's container printed (``kubectl logs`` needs a kubelet server)."""
        logs = sorted((self.workdir / namespace).glob(f"{pod}-*/container.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    # ---- pods ---------------------------------------------------------------------------------

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sync()
            except (ApiException, OSError) as error:
                print(f"process kubelet: {error}", file=sys.stderr)

    def sync(self) -> None:
        pods = self.api.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.name}"
        ).to_dict()["items"]
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            running = self.pods.get(uid)
            deleting = pod["metadata"].get("deletion_timestamp") is not None
            if running is None and uid not in self.done:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    # Finished under an earlier kubelet of this node's name (a module's node
                    # started again): terminal, never run again, as a kubelet does.
                    self.done.add(uid)
                    continue
                if deleting:
                    self._release(pod)  # never started: nothing to stop
                    continue
                self._start(pod)
            elif running is not None and running.process.poll() is not None:
                key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
                self.lifetimes[key] = (self.lifetimes[key][0], time.time())
                self._report_exit(pod, running)
                if running.address:  # the sandbox is gone: its address back to the pool
                    clusterdns.release_address(running.address)
                del self.pods[uid]
                self.done.add(uid)
                if deleting:
                    self._release(pod)
            elif running is not None and deleting:
                self._terminate(pod, running)
            elif running is not None:
                self._probe(pod, running)
            elif uid in self.done and deleting:
                self._release(pod)
        for uid in [u for u in self.pods if u not in seen]:  # force-deleted behind our back
            with contextlib.suppress(ProcessLookupError):
                gone = self.pods.pop(uid)
            os.killpg(gone.process.pid, signal.SIGKILL)
            podrun.remove(gone.container)
            if gone.address:
                clusterdns.release_address(gone.address)

    def _probe(self, pod: dict[str, Any], running: Running) -> None:
        """Run the first container's httpGet readiness probe when its period is up; report a
        change of readiness."""
        container = pod["spec"]["containers"][0]
        probe = (container.get("readiness_probe") or {}).get("http_get")
        period = (container.get("readiness_probe") or {}).get("period_seconds") or 10
        if not probe or time.monotonic() - running.probed_at < min(period, 2):
            return
        running.probed_at = time.monotonic()
        port = probe["port"]
        if isinstance(port, str) and not port.isdigit():  # a named port
            named = {p["name"]: p["container_port"] for p in container.get("ports") or []}
            port = named.get(port, 0)
        try:
            url = f"http://127.0.0.1:{port}{probe.get('path') or '/'}"
            with urllib.request.urlopen(url, timeout=1) as answer:
                ready = 200 <= answer.status < 400
        except (OSError, ValueError):
            ready = False
        if ready != running.ready:
            running.ready = ready
            state = {"running": {"startedAt": running.started}}
            self._patch_status(pod, "Running", state, ready=ready, started=running.started)

    def _terminate(self, pod: dict[str, Any], running: Running) -> None:
        if running.kill_at is None:
            grace = pod["metadata"].get("deletion_grace_period_seconds")
            grace = (
                pod["spec"].get("termination_grace_period_seconds", 30) if grace is None else grace
            )
            running.kill_at = time.monotonic() + grace
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGTERM)
        elif time.monotonic() >= running.kill_at:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGKILL)
            podrun.remove(running.container)  # podman's own process is not the container

    def _release(self, pod: dict[str, Any]) -> None:
        """The kubelet's last word on a deleted pod: its containers are gone, remove it now."""
        meta = pod["metadata"]
        with contextlib.suppress(ApiException):
            self.api.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0)

    # ---- starting a pod -----------------------------------------------------------------------

    def _volumes(self, pod: dict[str, Any], folder: Path) -> dict[str, Path]:
        """mountPath -> host folder for the first container; a projected SA token is filled."""
        spec = pod["spec"]
        container = spec["containers"][0]
        by_name = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volume_mounts") or []:
            host = folder / "volumes" / mount["name"]
            host.mkdir(parents=True, exist_ok=True)
            volume = by_name.get(mount["name"]) or {}
            if volume.get("projected") and mount["mount_path"] == TOKEN_PATH:
                self._service_account_files(pod, host)
            mounts[mount["mount_path"]] = host
        return mounts

    def _service_account_files(self, pod: dict[str, Any], host: Path) -> None:
        meta, account = pod["metadata"], pod["spec"].get("service_account_name") or "default"
        request = {
            "spec": {
                "audiences": [],
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            }
        }
        token = self.api.create_namespaced_service_account_token(
            account, meta["namespace"], request
        )
        (host / "token").write_text(token.status.token)
        (host / "ca.crt").write_bytes(self.ca.read_bytes())
        (host / "namespace").write_text(meta["namespace"])
        # In-cluster clients read the token from a fixed path this agent cannot bind-mount (no
        # mount namespaces here); the same token and CA reach them as a kubeconfig instead.
        (host / "kubeconfig").write_text(
            kubeconfig(self.server, host / "ca.crt", {"token": token.status.token})
        )

    def _env(
        self, pod: dict[str, Any], mounts: dict[str, Path], ip: str, process: bool = True
    ) -> dict[str, str]:
        """The container's env; a process also gets this machine's (``base_env``), a container
        only what its pod says."""
        namespace = pod["metadata"]["namespace"]
        container = pod["spec"]["containers"][0]
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        env = {
            **(self.base_env if process else {}),
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "HOSTNAME": pod["metadata"]["name"],
        }
        for source in container.get("env_from") or []:
            if source.get("secret_ref"):
                env.update(self._secret(namespace, source["secret_ref"]["name"]))
            if source.get("config_map_ref"):
                env.update(self._config_map(namespace, source["config_map_ref"]["name"]))
        for item in container.get("env") or []:
            value = item.get("value")
            source = item.get("value_from") or {}
            if source.get("secret_key_ref"):
                ref = source["secret_key_ref"]
                value = self._secret(namespace, ref["name"]).get(ref["key"])
            elif source.get("config_map_key_ref"):
                ref = source["config_map_key_ref"]
                value = self._config_map(namespace, ref["name"]).get(ref["key"])
            elif source.get("field_ref"):
                value = _field(pod, source["field_ref"]["field_path"], ip)
            if value is not None:
                env[item["name"]] = _mapped(value, mounts)
        if TOKEN_PATH in mounts:
            env["KUBECONFIG"] = str(mounts[TOKEN_PATH] / "kubeconfig")
        return env

    def _secret(self, namespace: str, name: str) -> dict[str, str]:
        try:
            data = self.api.read_namespaced_secret(name, namespace).data or {}
        except ApiException:
            return {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        try:
            return dict(self.api.read_namespaced_config_map(name, namespace).data or {})
        except ApiException:
            return {}

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        folder = self.workdir / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        container = spec["containers"][0]
        if self.containers and not self.dns and container["image"].startswith("localhost/"):
            self._start_container(pod, folder)
            return
        mounts = self._volumes(pod, folder)
        address = clusterdns.claim_address() if self.dns else None
        env = self._env(pod, mounts, address or self.pod_ip)
        termination = folder / "termination-log"
        env["ELMTRAIN_TERMINATION_LOG"] = str(termination)  # the kubelet's bind of the log file
        command = list(container.get("command") or _entrypoint(container["image"]))
        # Only the container's own words name paths inside it; this machine's program does not
        # (a venv under /tmp is no path below a pod's /tmp mount).
        inside = [*command[1:], *(container.get("args") or [])]
        by_image = [argv for end, argv in self.images.items() if container["image"].endswith(end)]
        program = (by_image or [self.programs.get(command[0], [_mapped(command[0], mounts)])])[0]
        argv = [*program, *(_mapped(a, mounts) for a in inside)]
        if address and self.dns:
            argv = self._sandboxed(pod, folder, address, self.dns, argv)
        cwd = _mapped(container.get("working_dir") or str(folder), mounts)
        log = folder / "container.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd if Path(cwd).is_dir() else folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        running = Running(process, folder, _now(), termination, log, address=address)
        running.ready = not container.get("readiness_probe")  # else the probe says when
        self.pods[meta["uid"]] = running
        self.started_pods.append(f"{meta['namespace']}/{meta['name']}")
        self.lifetimes[f"{meta['namespace']}/{meta['name']}"] = (time.time(), None)
        state = {"running": {"startedAt": running.started}}
        self._patch_status(pod, "Running", state, ready=running.ready, started=running.started)

    def _start_container(self, pod: dict[str, Any], folder: Path) -> None:
        """The pod's container run by podman from the pod spec as the API serves it; the
        service-account token, where the pod mounts one, bound at its real path."""
        meta = pod["metadata"]
        served = self.api.read_namespaced_pod(
            meta["name"], meta["namespace"], _preload_content=False
        )
        spec = json.loads(served.data)["spec"]
        mounts = self._volumes(pod, folder)
        mounted = {TOKEN_PATH: mounts[TOKEN_PATH]} if TOKEN_PATH in mounts else {}
        env = self._env(pod, {}, self.pod_ip, process=False)
        name = f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
        log = folder / "container.log"
        try:
            argv = podrun.run_command(spec, name=name, env=env, folder=folder, mounted=mounted)
        except podrun.PodRefusedError as refused:
            log.write_text(f"{refused}\n")
            argv = ["sh", "-c", f"exit {podrun.REFUSED}"]  # reported as a StartError
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        running = Running(process, folder, _now(), folder / "termination-log", log, container=name)
        running.ready = not spec["containers"][0].get("readinessProbe")
        self.pods[meta["uid"]] = running
        self.started_pods.append(f"{meta['namespace']}/{meta['name']}")
        self.lifetimes[f"{meta['namespace']}/{meta['name']}"] = (time.time(), None)
        state = {"running": {"startedAt": running.started}}
        self._patch_status(pod, "Running", state, ready=running.ready, started=running.started)

    def _sandboxed(
        self, pod: dict[str, Any], folder: Path, address: str, dns: str, argv: list[str]
    ) -> list[str]:
        """``argv`` in the pod's own mount and UTS namespaces, with the kubelet's resolv.conf
        and /etc/hosts bound over this machine's and the pod's host name set (a container
        runtime's sandbox, without the network namespace: the pod's address is on lo)."""
        meta, spec = pod["metadata"], pod["spec"]
        hostname = spec.get("hostname") or meta["name"]
        resolv, hosts = folder / "resolv.conf", folder / "hosts"
        resolv.write_text(clusterdns.resolv_conf(dns, meta["namespace"]))
        subdomain = spec.get("subdomain")
        hosts.write_text(clusterdns.hosts_file(address, hostname, subdomain, meta["namespace"]))
        script = (
            'mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts && '
            'hostname "$3" && shift 3 && exec "$@"'
        )
        isolate = ["unshare", "--mount", "--uts", "--propagation", "private"]
        return [*isolate, "sh", "-c", script, "pod", str(resolv), str(hosts), hostname, *argv]

    # ---- status -------------------------------------------------------------------------------

    def _report_exit(self, pod: dict[str, Any], running: Running) -> None:
        code = running.process.returncode
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        message = (
            running.termination.read_text(errors="replace")[-4096:]
            if running.termination.is_file()
            else ""
        )
        policy = pod["spec"]["containers"][0].get("termination_message_policy")
        if not message.strip() and code != 0 and policy == "FallbackToLogsOnError":
            message = running.log.read_text(errors="replace")[-2048:]
        reason = "Completed" if code == 0 else "Error"
        if running.container and code in podrun.START_ERRORS:
            # podman could not create or start it (no such image, a spec it refuses): as a
            # kubelet reports it, not an exit of the program, and never retried in place.
            reason, code = "StartError", 128
            message = running.log.read_text(errors="replace")[-2048:]
        terminated = {
            "exitCode": code,
            "reason": reason,
            "message": message,
            "startedAt": running.started,
            "finishedAt": _now(),
            "containerID": running.container_id,
        }
        phase = "Succeeded" if code == 0 else "Failed"
        state = {"terminated": terminated, "running": None, "waiting": None}  # one state only
        self._patch_status(pod, phase, state, ready=False, started=running.started)

    def _patch_status(
        self, pod: dict[str, Any], phase: str, state: dict[str, Any], ready: bool, started: str
    ) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        running = self.pods.get(meta["uid"])
        ip = (running.address if running else None) or self.pod_ip
        for _ in range(10):  # conflicts: the API server adds conditions too (DisruptionTarget)
            current = self.api.read_namespaced_pod(meta["name"], meta["namespace"])
            raw = self.api.api_client.sanitize_for_serialization(current)
            conditions = {c["type"]: c for c in (raw.get("status") or {}).get("conditions") or []}
            now = _now()
            for kind in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready"):
                value = (
                    "True"
                    if ready or kind in ("Initialized", "PodReadyToStartContainers")
                    else "False"
                )
                if conditions.get(kind, {}).get("status") != value:
                    conditions[kind] = {"type": kind, "status": value, "lastTransitionTime": now}
            status = {
                "phase": phase,
                "conditions": list(conditions.values()),
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": started,
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "imageID": container["image"],
                        "ready": ready,
                        "started": "running" in state,
                        "restartCount": 0,
                        "state": state,
                        **({"containerID": running.container_id} if running else {}),
                    }
                ],
            }
            body = {
                "metadata": {"resourceVersion": raw["metadata"]["resourceVersion"]},
                "status": status,
            }
            try:
                self.api.patch_namespaced_pod_status(meta["name"], meta["namespace"], body)
                return
            except ApiException as error:
                if error.status == 404:
                    return
                if error.status != 409:
                    raise
        raise RuntimeError(f"could not report {meta['namespace']}/{meta['name']}: conflicts")


def _entrypoint(image: str) -> list[str]:
    for part, command in ENTRYPOINTS.items():
        if part in image.split("@", maxsplit=1)[0].rsplit("/", 1)[-1]:
            return command
    raise ValueError(f"no entrypoint known for image {image}")


def _mapped(value: str, mounts: dict[str, Path]) -> str:
    """A path inside the container rewritten to the host folder of its mount."""
    for mount_path, host in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(host) + value[len(mount_path) :]
    return value


def _field(pod: dict[str, Any], path: str, pod_ip: str) -> str | None:
    meta = pod["metadata"]
    known = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("node_name"),
        "spec.serviceAccountName": pod["spec"].get("service_account_name"),
        "status.podIP": pod_ip,
        "status.hostIP": "127.0.0.1",
    }
    # metadata.labels['k'] and metadata.annotations['k'], as a kubelet resolves them: the Job
    # controller hands an Indexed Job's pod its JOB_COMPLETION_INDEX through an annotation.
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if keyed:
        value = (meta.get(keyed.group(1)) or {}).get(keyed.group(2))
        return None if value is None else str(value)
    return known.get(path)

"""A local "kubelet" + Job controller: runs each Job's container command as a local process.

It reads Jobs from the emulator, resolves the container's environment (values and Secret keys),
maps volume mounts to per-Job folders, runs the command (``elmtrain`` is this venv's), and
writes the Job status the way Kubernetes does: retries within ``backoffLimit``, the pod failure
policy's rules (FailJob, Ignore, Count; on exit codes or the DisruptionTarget condition), Complete
on success. Deleting a Job kills its process; ``evict`` preempts a pod like a node drain does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmock import resource

from tests.harness.emulator import ClusterEmulator, _now

JOBS = resource("batch/v1/jobs")
SECRETS = resource("v1/secrets")
PROGRAMS = {
    "elmtrain": [sys.executable, "-m", "elmtrain"],
    "elmtrain-torchrun": [sys.executable, "-m", "elmtrain.run.launch"],
}


@dataclass
class Pod:
    process: asyncio.subprocess.Process
    log: Path
    termination: Path
    disrupted: bool = False  # evicted: the pod carries a DisruptionTarget condition


@dataclass
class Kubelet:
    cluster: ClusterEmulator
    workdir: Path
    base_env: dict[str, str]
    poll_seconds: float = 0.2
    programs: dict[str, list[str]] = field(default_factory=lambda: dict(PROGRAMS))
    pods: dict[str, Pod] = field(default_factory=dict)  # by Job uid
    failures: dict[str, int] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    started: list[str] = field(default_factory=list)  # Job names, in start order (one per pod)
    evictions: int = 0

    async def run(self) -> None:
        try:
            while True:
                await self.sync()
                await asyncio.sleep(self.poll_seconds)
        finally:
            await self.stop_all()

    async def sync(self) -> None:
        jobs = {job["metadata"]["uid"]: job for job in self.cluster.live(JOBS)}
        for uid in [u for u in self.pods if u not in jobs]:
            await self._kill(self.pods.pop(uid))  # the Job was deleted: its pod goes too
        for uid, job in jobs.items():
            if uid in self.finished:
                continue
            pod = self.pods.get(uid)
            if pod is None:
                await self._start(job)
            elif pod.process.returncode is not None:
                del self.pods[uid]
                await self._finish(job, pod)

    def _env(self, job: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
        namespace = job["metadata"]["namespace"]
        env = dict(self.base_env)
        container = job["spec"]["template"]["spec"]["containers"][0]
        for item in container.get("env", []):
            value = item.get("value")
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref is not None:
                secret = self.cluster.get(SECRETS, namespace, ref["name"]) or {}
                raw = (secret.get("data") or {}).get(ref["key"])
                if raw is None:
                    continue  # optional keys may be absent; the operator checks required ones
                value = base64.b64decode(raw).decode()
            if value is None:
                continue
            for mount_path, host in mounts.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = str(host) + value[len(mount_path) :]
            env[item["name"]] = value
        return env

    async def _start(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        pod_number = self.started.count(meta["name"])
        folder = self.workdir / meta["namespace"] / f"{meta['name']}-{pod_number}"
        folder.mkdir(parents=True, exist_ok=True)
        container = job["spec"]["template"]["spec"]["containers"][0]
        mounts = {}
        for mount in container.get("volumeMounts", []):
            host = folder / mount["name"]
            host.mkdir(exist_ok=True)
            mounts[mount["mountPath"]] = host
        env = self._env(job, mounts)
        termination = folder / "termination-log"
        env["ELMTRAIN_TERMINATION_LOG"] = str(termination)
        command = list(container.get("command") or [])
        program = self.programs.get(command[0], command[:1])
        argv = [*program, *command[1:], *container.get("args", [])]
        log = folder / "pod.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=folder,
                start_new_session=True,
            )
        self.pods[meta["uid"]] = Pod(process, log, termination)
        self.started.append(meta["name"])
        status = dict(job.get("status") or {})
        status.update(active=1, startTime=status.get("startTime") or _now())
        await self.cluster.write_status(JOBS, meta["namespace"], meta["name"], status)

    async def _finish(self, job: dict[str, Any], pod: Pod) -> None:
        meta, spec = job["metadata"], job["spec"]
        code = pod.process.returncode
        status = dict(job.get("status") or {})
        status["active"] = 0
        message = pod.termination.read_text() if pod.termination.exists() else ""
        if code == 0:
            status.update(succeeded=1, completionTime=_now())
            status["conditions"] = [
                {"type": "Complete", "status": "True", "lastTransitionTime": _now()}
            ]
            self.finished.add(meta["uid"])
        else:
            action = self._policy_action(spec, code, pod.disrupted)
            failed = self.failures.get(meta["uid"], 0) + (action != "Ignore")
            self.failures[meta["uid"]] = failed
            status["failed"] = failed
            reason = None
            if action == "FailJob":
                reason = "PodFailurePolicy"
            elif failed > int(spec.get("backoffLimit", 6)):
                reason = "BackoffLimitExceeded"
            if reason is None:
                await self.cluster.write_status(JOBS, meta["namespace"], meta["name"], status)
                return  # the Job controller starts a replacement pod on the next sync
            status["conditions"] = [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason,
                    "message": f"container trainer failed with exit code {code}: {message}".strip(),
                    "lastTransitionTime": _now(),
                }
            ]
            self.finished.add(meta["uid"])
        await self.cluster.write_status(JOBS, meta["namespace"], meta["name"], status)

    @staticmethod
    def _policy_action(spec: dict[str, Any], code: int | None, disrupted: bool) -> str:
        """The first matching rule's action (FailJob, Ignore, Count), else Count."""
        for rule in (spec.get("podFailurePolicy") or {}).get("rules", []):
            codes = rule.get("onExitCodes")
            if codes is not None:
                inside = code in codes.get("values", [])
                if inside == (codes.get("operator", "In") == "In"):
                    return str(rule["action"])
            for condition in rule.get("onPodConditions") or []:
                if disrupted and condition.get("type") == "DisruptionTarget":
                    return str(rule["action"])
        return "Count"

    async def evict(self, job_name: str, grace: float) -> bool:
        """Preempt the Job's running pod: DisruptionTarget, SIGTERM, SIGKILL after ``grace``."""
        for uid, pod in self.pods.items():
            job = next((j for j in self.cluster.live(JOBS) if j["metadata"]["uid"] == uid), None)
            if job is not None and job["metadata"]["name"] == job_name:
                pod.disrupted = True
                self.evictions += 1
                await self._kill(pod, grace)
                return True
        return False

    async def _kill(self, pod: Pod, grace: float = 5.0) -> None:
        if pod.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pod.process.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            await asyncio.wait_for(pod.process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.process.pid, signal.SIGKILL)
            await pod.process.wait()

    async def stop_all(self) -> None:
        pods, self.pods = list(self.pods.values()), {}
        await asyncio.gather(*(self._kill(pod, grace=2.0) for pod in pods))

"""Local mode's Job controller: runs each trainer Job's command as a local process.

The same Job body the operator would create is read for its command, environment, failure
policy and backoff limit, and its exits are judged as the Job controller judges pods: exit 0
succeeds, a FailJob exit code (bad input) fails at once, anything else is retried until the
backoff limit. An Indexed Job's pods run one after another, each with its
``JOB_COMPLETION_INDEX``; the Job succeeds when the last has. Stopping ``up`` (Ctrl-C) is not
a failure: the trainer commits a checkpoint on SIGTERM and the next ``up`` restarts the Job,
which resumes from it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from elmforest.local.state import JobRecord, LocalState
from elmforest.planner.jobs import GPU_RESOURCE
from elmforest.planner.naming import ANNOTATION_RUN, LABEL_ROLE
from elmforest.planner.observed import JobPhase, JobState

PROGRAMS = {
    "elmtrain": [sys.executable, "-m", "elmtrain"],
    "elmtrain-torchrun": [sys.executable, "-m", "elmtrain.run.launch"],
}
# Container paths that mean nothing on this machine; the runner sets its own.
_CONTAINER_ENV = {"ELMTRAIN_CACHE", "HF_HOME", "TMPDIR"}
STOP_GRACE_SECONDS = 30.0  # SIGTERM -> the trainer commits a checkpoint -> exit


def usable_cpus() -> int:
    """Cores this process may run on (its affinity, e.g. a container's cpuset), not the host's."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """GPU ids this machine offers (CUDA_VISIBLE_DEVICES, else nvidia-smi), without torch."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]


def job_record(body: dict[str, Any], log: Path) -> JobRecord:
    """The parts of a batch/v1 Job body that a local process needs."""
    meta, spec = body["metadata"], body["spec"]
    container = spec["template"]["spec"]["containers"][0]
    owner = (meta.get("ownerReferences") or [{}])[0]
    fail_codes = [
        int(code)
        for rule in spec.get("podFailurePolicy", {}).get("rules", [])
        if rule.get("action") == "FailJob" and "onExitCodes" in rule
        for code in rule["onExitCodes"]["values"]
    ]
    env = {
        item["name"]: str(item["value"])
        for item in container.get("env", [])
        if "value" in item and item["name"] not in _CONTAINER_ENV
    }
    gpus = container.get("resources", {}).get("limits", {}).get(GPU_RESOURCE, 0)
    indexed = spec.get("completionMode") == "Indexed"  # its indexes run one after another
    if gpus:
        env["ELMFOREST_LOCAL_GPUS"] = str(gpus)
    return JobRecord(
        name=meta["name"],
        owner=f"{owner.get('kind', '')}/{owner.get('name', '')}",
        run_id=meta.get("annotations", {}).get(ANNOTATION_RUN, ""),
        role=meta.get("labels", {}).get(LABEL_ROLE, "branch"),
        command=[*container["command"], *container.get("args", [])],
        env=env,
        fail_exit_codes=fail_codes,
        backoff_limit=int(spec.get("backoffLimit", 3)),
        completions=int(spec.get("completions", 1)) if indexed else 1,
        log=str(log),
    )


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log: IO[bytes]
    gpus: list[str]


@dataclass
class ProcessRunner:
    logs: Path
    cache: Path
    parallel: int
    cpus: int = field(default_factory=usable_cpus)
    gpus: list[str] = field(default_factory=visible_gpus)
    processes: dict[str, _Process] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)  # restart backoff
    stopping: bool = False

    # ---- what the planners see -----------------------------------------------------------

    @staticmethod
    def job_state(record: JobRecord) -> JobState:
        phase: JobPhase = "Running"  # a queued Job is Running to the planner, as a pending pod
        if record.phase in ("Succeeded", "Failed"):
            phase = record.phase
        started = record.phase != "Pending" or record.completed > 0  # a process was started
        return JobState(record.name, phase, record.reason, record.message, started=started)

    def queued(self, record: JobRecord) -> bool:
        return record.phase == "Pending" and record.name not in self.processes

    @staticmethod
    def resume(state: LocalState) -> None:
        """Jobs that were running when the last ``up`` stopped start again (and resume)."""
        for record in state.jobs.values():
            if record.phase == "Running":
                record.phase = "Pending"

    # ---- what the planners ask -----------------------------------------------------------

    def submit(self, state: LocalState, body: dict[str, Any]) -> bool:
        """Add the Job (a no-op if it exists, as a 409 from the API server would be)."""
        name = body["metadata"]["name"]
        if name in state.jobs:
            return False
        state.jobs[name] = job_record(body, self.logs / f"{name}.log")
        return True

    def delete(self, state: LocalState, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            self._terminate([process])
        state.jobs.pop(name, None)

    # ---- the control loop ----------------------------------------------------------------

    def sync(self, state: LocalState) -> list[str]:
        """Reap exited processes and start queued Jobs; returns what happened, for the log."""
        events = []
        for name, process in list(self.processes.items()):
            code = process.popen.poll()
            if code is None:
                continue
            del self.processes[name]
            process.log.close()
            record = state.jobs.get(name)
            if record is not None:
                events.append(self._judge(record, code))
        for record in state.jobs.values():
            if self.stopping or len(self.processes) >= self.parallel:
                break
            if not self.queued(record) or time.monotonic() < self.not_before.get(record.name, 0):
                continue
            gpus = self._free_gpus(record)
            if gpus is None:
                continue  # waits for GPUs, as a pod waits for a node that has them
            self._start(state, record, gpus)
            events.append(f"{record.name}: started")
        return events

    def _free_gpus(self, record: JobRecord) -> list[str] | None:
        """The GPUs for this Job (one at least, on a GPU machine), or None if too few are free."""
        if not self.gpus:
            return []
        busy = {g for p in self.processes.values() for g in p.gpus}
        free = [g for g in self.gpus if g not in busy]
        wanted = max(1, int(record.env.get("ELMFOREST_LOCAL_GPUS", "1")))
        return free[:wanted] if len(free) >= min(wanted, len(self.gpus)) else None

    def _judge(self, record: JobRecord, code: int) -> str:
        if code == 0:
            record.completed += 1
            if record.completed < record.completions:  # the next index runs next
                record.phase = "Pending"
                record.message = f"{record.completed} of {record.completions} indexes succeeded"
                return f"{record.name}: index {record.completed - 1} succeeded"
            record.phase, record.reason = "Succeeded", "Completed"
            return f"{record.name}: succeeded"
        message = _termination_message(record) or f"exit code {code}"
        if code in record.fail_exit_codes:
            record.phase, record.reason, record.message = "Failed", "PodFailurePolicy", message
            return f"{record.name}: failed (bad input): {message}"
        record.failures += 1
        if record.failures > record.backoff_limit:
            record.phase, record.reason = "Failed", "BackoffLimitExceeded"
            record.message = f"{record.failures} failures; last: {message}"
            return f"{record.name}: failed after {record.failures} attempts: {message}"
        record.phase, record.message = "Pending", message
        self.not_before[record.name] = time.monotonic() + min(60.0, 2.0 * 2**record.failures)
        return f"{record.name}: exited {code} ({message}); retrying"

    def _start(self, state: LocalState, record: JobRecord, gpus: list[str]) -> None:
        threads = self._threads(state, record)
        env = {
            **os.environ,
            **record.env,
            "ELMTRAIN_CACHE": str(self.cache),
            "ELMFOREST_LOG_FORMAT": "console",  # a person reads these files
            "ELMTRAIN_TERMINATION_LOG": str(_termination_path(record)),
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if record.completions > 1:
            env["JOB_COMPLETION_INDEX"] = str(record.completed)  # as the Job controller sets
        command = [*PROGRAMS.get(record.command[0], [record.command[0]]), *record.command[1:]]
        log_path = Path(record.log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _termination_path(record).unlink(missing_ok=True)
        log = log_path.open("ab")
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- {stamp} UTC start (failures so far: {record.failures})\n".encode())
        log.flush()
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches `up`, which stops the trainers gracefully
        )
        self.processes[record.name] = _Process(popen, log, gpus)
        record.phase = "Running"

    def _threads(self, state: LocalState, record: JobRecord) -> int:
        """CPU threads for a new process: the tokenizer and seed run alone (branches wait for
        them), so they get every core; branches share the cores with each other."""
        if record.role != "branch":
            return self.cpus
        branches = [r for r in state.jobs.values() if r.role == "branch"]
        wanting = sum(1 for r in branches if r.phase in ("Pending", "Running"))
        return max(1, self.cpus // max(1, min(self.parallel, wanting)))

    def stop_all(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM every trainer (it checkpoints and exits), SIGKILL what outlives ``grace``.

        Their Jobs stay Running in the state: the next ``up`` restarts and resumes them.
        """
        self.stopping = True
        processes = list(self.processes.values())
        try:
            self._terminate(processes, grace)
        except KeyboardInterrupt:  # asked twice: no more grace (the trainers resume anyway)
            for process in processes:
                _signal(process, signal.SIGKILL)
            raise
        finally:
            self.processes.clear()

    @staticmethod
    def _terminate(processes: list[_Process], grace: float = STOP_GRACE_SECONDS) -> None:
        for process in processes:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
                process.popen.wait()
            process.log.close()


def _signal(process: _Process, signum: signal.Signals) -> None:
    if process.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it exited in between
            os.killpg(process.popen.pid, signum)


def _termination_path(record: JobRecord) -> Path:
    return Path(record.log).with_suffix(".termination")


def _termination_message(record: JobRecord) -> str:
    try:
        return _termination_path(record).read_text().strip()
    except OSError:
        return ""

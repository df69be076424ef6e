"""Local mode's stand-in for the API server: the objects, their statuses and Jobs, in one file.

``<state-dir>/state.json`` is rewritten atomically after every change, and one ``up`` at a time
holds ``<state-dir>/lock``; so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from elmcore.errors import BadInputError
from elmcore.storage import open_storage

STATE_FILE = "state.json"
LocalJobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class ObjectRecord(BaseModel):
    """One ElmForest, ElmBranch or ElmClusterSet as the API server would hold it."""

    kind: str
    name: str
    uid: str = Field(default_factory=lambda: str(uuid.uuid4()))
    created: str  # orders branches for domain ownership (oldest wins), as creationTimestamp
    generation: int = 1
    source: str  # the YAML file that declares it
    spec: dict[str, Any]
    status: dict[str, Any] = Field(default_factory=dict)
    deleting: bool = False
    owner: str | None = None  # "<Kind>/<name>" of the object that generated it (not a file)
    labels: dict[str, str] = Field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """The object shaped as Kubernetes returns it (what the planners' helpers read)."""
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": "local",
            "uid": self.uid,
            "creationTimestamp": self.created,
            "generation": self.generation,
        }
        if self.deleting:
            metadata["deletionTimestamp"] = self.created
        if self.labels:
            metadata["labels"] = dict(self.labels)
        return {"metadata": metadata, "spec": self.spec, "status": self.status}


class JobRecord(BaseModel):
    """A trainer Job run as local processes; restarted (and resumed) by the next ``up``."""

    name: str
    owner: str  # "<Kind>/<name>"
    run_id: str
    role: str = "branch"  # tokenizer | seed | branch
    command: list[str]  # the container's command and args
    env: dict[str, str] = Field(default_factory=dict)
    fail_exit_codes: list[int] = Field(default_factory=list)  # podFailurePolicy FailJob
    backoff_limit: int = 3
    completions: int = 1  # an Indexed Job's: its indexes run one after another
    completed: int = 0  # indexes that succeeded (the next to run, while Pending)
    phase: LocalJobPhase = "Pending"
    failures: int = 0
    reason: str = ""
    message: str = ""
    log: str = ""


class LocalState(BaseModel):
    forests: dict[str, ObjectRecord] = Field(default_factory=dict)
    branches: dict[str, ObjectRecord] = Field(default_factory=dict)
    cluster_sets: dict[str, ObjectRecord] = Field(default_factory=dict)
    jobs: dict[str, JobRecord] = Field(default_factory=dict)
    sequence: int = 0  # makes ``created`` strictly increasing within one second

    def stamp(self) -> str:
        self.sequence += 1
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{now}#{self.sequence:06d}"


class StateStore:
    """Load and save the state of one state folder (one ``up`` at a time: see :meth:`lock`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._storage = open_storage(str(folder.absolute()))

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    def load(self) -> LocalState:
        path = self.folder / STATE_FILE
        if not path.exists():
            return LocalState()
        try:
            return LocalState.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError, ValidationError) as error:
            raise BadInputError(f"{path}: unreadable local state ({error})") from None

    def save(self, state: LocalState) -> None:
        text = state.model_dump_json(indent=1)
        self._storage.write_bytes(STATE_FILE, text.encode())

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; a second ``up`` on it fails at once."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "lock").open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise BadInputError(
                    f"{self.folder} is in use by elmforest (pid {holder}); wait for it to finish"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

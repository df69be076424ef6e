"""Small JSON records the trainer writes and the operator reads."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from elmcore.names import DNS1123_LABEL, DNS1123_LABEL_MAX, Domain


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileDigest(Record):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class CommitMarker(Record):
    """Written last into an artifact folder: the folder is readable only once this exists."""

    files: dict[str, FileDigest]
    step: int | None = None
    committed_at: str = Field(default_factory=utc_now)


class Progress(Record):
    """Where a training run stands; written to ``runs/<id>/progress.json`` at intervals."""

    run_id: str
    phase: Literal["preparing", "initializing", "training", "evaluating", "done", "failed"]
    step: int = 0  # preparing: bytes of text read
    total_steps: int = 0  # preparing: bytes of text in all
    tokens_per_second: float = 0.0
    loss: float | None = None
    eta_seconds: float | None = None
    message: str = ""  # phase "failed": why (the bad input's file and problem)
    updated_at: str = Field(default_factory=utc_now)


class Parent(Record):
    """One input of an expert's initialisation and its weight (lineage)."""

    kind: Literal["seed", "expert"]
    domain: Domain | None = None
    version: int | None = None
    weight: float


class CurvePoint(Record):
    """Validation loss after ``step`` optimizer steps: one point of a learning curve."""

    step: int = Field(ge=0)
    loss: float
    perplexity: float


class Metrics(Record):
    """Validation perplexity on the expert's own domain, before and after training (and, with
    ``training.eval_interval``, every that many steps in between: ``curve``)."""

    val_loss_before: float | None = None
    val_ppl_before: float | None = None
    val_loss_after: float | None = None
    val_ppl_after: float | None = None
    val_tokens: int = 0
    train_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    curve: list[CurvePoint] = Field(default_factory=list)


class SourceFile(Record):
    """One text file a run read, as it was then."""

    location: str  # the location as given (a file, or the folder the file was found in)
    key: str = ""  # the file within the folder ("" when the location is the file)
    size: int = Field(ge=0)
    sha256: str


class ClusterLineage(Record):
    """The cluster an expert was trained on (c-BTM, issue 30): cluster ``index`` of the clusterer
    of set ``set`` whose commit marker's sha256 is ``clusterer_sha256``. Routing by cluster
    weights this expert by that cluster (elmtrain.clusters.routing)."""

    set: str = Field(pattern=DNS1123_LABEL, max_length=DNS1123_LABEL_MAX)
    index: int = Field(ge=0)
    clusterer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Lineage(Record):
    data: list[SourceFile] = Field(default_factory=list)  # training text
    val_data: list[SourceFile] = Field(default_factory=list)  # validation text
    training: dict[str, Any] = Field(default_factory=dict)  # the effective TrainingConfig
    pretrained: str | None = None  # the seed's imported weights, when not trained from scratch
    tokenizer_sha256: str | None = None
    seed_sha256: str | None = None  # experts: the forest's seed when this one was trained
    image: str | None = None  # the trainer image, by digest (ELMTRAIN_IMAGE)
    elmtrain_version: str = "unknown"
    # Experts of a cluster set only. Left out while None: the previous release's operator
    # forbids unknown fields and reads results and the manifest during an upgrade.
    cluster: ClusterLineage | None = Field(default=None, exclude_if=lambda value: value is None)

    @property
    def data_sha256(self) -> str:
        """One digest of every training file's content: equal iff the same text was read."""
        return files_digest(self.data)


def files_digest(files: list[SourceFile]) -> str:
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.location, f.key)):
        digest.update(f"{f.location}\0{f.key}\0{f.sha256}\n".encode())
    return digest.hexdigest()


class MixRecord(Record):
    """How the forest's mixture-of-experts model (``spec.mix``, BTX) was made: the planner's
    ``key`` (a digest of the expert set and the settings) says whether it is still current."""

    number: int = Field(ge=1)  # the forest's mixes count up: moe/v<number>-...
    key: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    top_k: int = Field(ge=1)
    router: Literal["random", "centroids"] = "random"
    average: Literal["uniform", "posterior"] = "uniform"
    router_only: bool = False
    steps: int = Field(0, ge=0)
    untrained_path: str = ""  # the mix before finetuning (relative to the forest root)


class Result(Record):
    """The outcome of a run: what the operator verifies and merges into the manifest."""

    run_id: str
    kind: Literal["tokenizer", "seed", "expert", "mix"]
    path: str  # key of the committed artifact, relative to the forest root
    sha256: str  # sha256 of the artifact's commit marker: names the exact bytes merged
    domain: Domain | None = None
    version: int | None = None
    init_strategy: str | None = None
    parents: list[Parent] = Field(default_factory=list)
    metrics: Metrics = Field(default_factory=Metrics)
    lineage: Lineage | None = None  # None: written before lineage was recorded
    # Kind "mix" only (parents: the experts mixed, their weights). Left out while None: the
    # previous release's operator forbids unknown fields and reads results during an upgrade.
    mix: MixRecord | None = Field(default=None, exclude_if=lambda value: value is None)
    finished_at: str = Field(default_factory=utc_now)


class ServingRecord(Record):
    """``serving/<replica>.json``: what one ``elmtrain serve`` replica serves; rewritten on every
    swap and every heartbeat, so a reader can tell a live replica from a gone one."""

    replica: str
    revision: int | None = None  # the manifest revision serving new requests; None: loading
    experts: dict[str, int] = Field(default_factory=dict)  # domain -> version
    message: str = ""
    updated_at: str = Field(default_factory=utc_now)


class AssignmentRecord(Record):
    """What one assignment worker of a cluster set wrote
    (``clusters/<set>/assign/part-<index>.json``): the operator sums the workers' records
    into the set's cluster sizes."""

    clusterer: str  # the sha256 of the clusterer that assigned
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    train: list[int]  # documents per cluster
    valid: list[int]
    files: list[str]  # the keys written, each one a text file of one cluster's split

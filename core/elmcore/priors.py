"""Stored cached priors (DESIGN §1): which text a forest's prior is computed from, and where it
is kept. One record per manifest revision and question (text content, sample size, sequence
length, sampling seed), so ``ensemble-eval``, ``generate``, ``serve`` and averaging compute it
once, and a new expert (a new revision) gets a new one. Pure."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection

from pydantic import Field

from elmcore.manifest import Manifest
from elmcore.records import Record, SourceFile, files_digest, utc_now

PRIORS = "priors"


class PriorQuestion(Record):
    """What a prior is of: the text (by content), how much of it, how cut."""

    data: list[SourceFile]
    sample: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    seed: int = 0
    # Over these experts alone (an endpoint that opted others out: their weights never run);
    # None: every expert of the revision.
    experts: list[str] | None = None

    def key(self) -> str:
        fields: dict[str, object] = {
            "data": files_digest(self.data), "sample": self.sample, "seq_len": self.seq_len,
            "seed": self.seed,
        }  # fmt: skip
        if self.experts is not None:  # absent otherwise: the keys stored before stay valid
            fields["experts"] = sorted(self.experts)
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class StoredPrior(Record):
    revision: int
    experts: dict[str, int]  # domain -> version the weights are over
    question: PriorQuestion
    weights: dict[str, float]  # domain -> P(D = domain)
    computed_at: str = Field(default_factory=utc_now)


def prior_key(revision: int, question: PriorQuestion) -> str:
    return f"{PRIORS}/rev-{revision:08d}/{question.key()}.json"


def experts_of(manifest: Manifest, only: Collection[str] | None = None) -> dict[str, int]:
    """Domain -> version of the revision's experts (``only`` these, when given)."""
    return {
        e.domain: e.version for e in manifest.sorted_experts() if only is None or e.domain in only
    }


def default_prior_locations(manifest: Manifest, only: Collection[str] | None = None) -> list[str]:
    """Without a sample of the expected text: every expert's validation text (its lineage),
    i.e. the forest's domains as a mixture (``only`` these experts' text, when given: an
    expert opted out lends nothing). Empty where none was recorded."""
    locations: list[str] = []
    for entry in manifest.sorted_experts():
        if only is not None and entry.domain not in only:
            continue
        for source in entry.lineage.val_data if entry.lineage else []:
            if source.location not in locations:
                locations.append(source.location)
    return locations

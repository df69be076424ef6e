"""The forest manifest (DESIGN §3) and the pure functions that change it.

Every change is a function ``Manifest -> Manifest`` that returns the input unchanged when it has
nothing to do; storage applies it by compare-and-swap, so a merge applied twice is a no-op.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from elmcore.errors import BadInputError, NotFoundError
from elmcore.names import Domain
from elmcore.records import Lineage, Metrics, Parent, Result, utc_now

SCHEMA_VERSION = 1


class ArtifactEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # relative to the forest root
    sha256: str  # sha256 of the artifact's commit marker
    run_id: str | None = None
    lineage: Lineage | None = None  # what made it (None: merged before lineage was recorded)


class ExpertEntry(ArtifactEntry):
    domain: Domain
    version: int = Field(ge=1)
    init_strategy: str | None = None
    parents: list[Parent] = Field(default_factory=list)
    metrics: Metrics = Field(default_factory=Metrics)
    merged_at: str = Field(default_factory=utc_now)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    revision: int = 0  # bumped by every change that is applied
    tokenizer: ArtifactEntry | None = None
    seed: ArtifactEntry | None = None
    experts: dict[str, ExpertEntry] = Field(default_factory=dict)  # keyed by domain

    def expert(self, domain: str) -> ExpertEntry:
        try:
            return self.experts[domain]
        except KeyError:
            known = ", ".join(sorted(self.experts)) or "none"
            raise NotFoundError(
                f"the manifest has no expert {domain!r} (experts: {known})"
            ) from None

    def sorted_experts(self) -> list[ExpertEntry]:
        return [self.experts[d] for d in sorted(self.experts)]


def _bumped(manifest: Manifest, **changes: object) -> Manifest:
    return manifest.model_copy(update={**changes, "revision": manifest.revision + 1})


def merge_result(manifest: Manifest, result: Result) -> Manifest:
    """Merge a finished run. Idempotent; an older version never replaces a newer one."""
    entry = ArtifactEntry(
        path=result.path, sha256=result.sha256, run_id=result.run_id, lineage=result.lineage
    )
    if result.kind == "tokenizer":
        if manifest.tokenizer is not None and manifest.tokenizer.sha256 == entry.sha256:
            return manifest
        if manifest.seed is not None or manifest.experts:
            raise BadInputError("the tokenizer cannot change once a seed or experts exist")
        return _bumped(manifest, tokenizer=entry)
    if result.kind == "seed":
        if manifest.seed is not None and manifest.seed.sha256 == entry.sha256:
            return manifest
        if manifest.experts:
            raise BadInputError("the seed cannot change once experts descend from it")
        return _bumped(manifest, seed=entry)
    if result.domain is None or result.version is None:
        raise BadInputError("an expert result needs a domain and a version")
    current = manifest.experts.get(result.domain)
    if current is not None and current.version > result.version:
        return manifest  # a newer version already merged: the late older one loses
    if current is not None and current.version == result.version:
        if current.sha256 == result.sha256:
            return manifest
        raise BadInputError(
            f"expert {result.domain} v{result.version} is already merged with other bytes"
        )
    expert = ExpertEntry(
        path=result.path,
        sha256=result.sha256,
        run_id=result.run_id,
        domain=result.domain,
        version=result.version,
        init_strategy=result.init_strategy,
        parents=result.parents,
        metrics=result.metrics,
        lineage=result.lineage,
    )
    return _bumped(manifest, experts={**manifest.experts, result.domain: expert})


def remove_expert(manifest: Manifest, domain: str, version: int | None = None) -> Manifest:
    """Drop a domain's expert (only ``version`` if given). Idempotent."""
    current = manifest.experts.get(domain)
    if current is None or (version is not None and current.version != version):
        return manifest
    experts = {d: e for d, e in manifest.experts.items() if d != domain}
    return _bumped(manifest, experts=experts)

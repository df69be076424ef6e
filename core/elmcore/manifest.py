"""The forest manifest (DESIGN §3) and the pure functions that change it.

Every change is a function ``Manifest -> Manifest`` that returns the input unchanged when it has
nothing to do; storage applies it by compare-and-swap, so a merge applied twice is a no-op.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from elmcore.errors import BadInputError, NotFoundError
from elmcore.names import Domain
from elmcore.records import Lineage, Metrics, MixRecord, Parent, Result, utc_now

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


class MixEntry(ArtifactEntry):
    """The forest's current mixture-of-experts model (``spec.mix``): replaced only when a newer
    mix is committed, so the previous one is served until then."""

    mix: MixRecord
    parents: list[Parent] = Field(default_factory=list)  # the experts mixed, average weights
    metrics: Metrics = Field(default_factory=Metrics)  # of the finetuning
    merged_at: str = Field(default_factory=utc_now)

    def experts(self) -> dict[str, int]:
        """domain -> version of the experts mixed."""
        return {p.domain: p.version for p in self.parents if p.domain and p.version}


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    revision: int = 0  # bumped by every change that is applied
    tokenizer: ArtifactEntry | None = None
    seed: ArtifactEntry | None = None
    experts: dict[str, ExpertEntry] = Field(default_factory=dict)  # keyed by domain
    # The experts as one MoE model (spec.mix), once made. Left out while None: the previous
    # release's readers forbid unknown fields, and read this file during an upgrade.
    mix: MixEntry | None = Field(default=None, exclude_if=lambda value: value is None)

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
    if result.kind == "mix":
        return merge_mix(manifest, result)
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


def merge_mix(manifest: Manifest, result: Result) -> Manifest:
    """Record a finished mix. Idempotent; a mix of a lower number never replaces a higher one
    (a late Job of a superseded expert set loses), and one number has one set of bytes."""
    if result.mix is None:
        raise BadInputError("a mix result needs its mix record")
    current = manifest.mix
    if current is not None:
        if current.mix.number > result.mix.number:
            return manifest
        if current.mix.number == result.mix.number:
            if current.sha256 == result.sha256 and current.mix.key == result.mix.key:
                return manifest
            raise BadInputError(f"mix v{result.mix.number} is already recorded with other bytes")
    entry = MixEntry(
        path=result.path,
        sha256=result.sha256,
        run_id=result.run_id,
        lineage=result.lineage,
        mix=result.mix,
        parents=result.parents,
        metrics=result.metrics,
    )
    return _bumped(manifest, mix=entry)


def remove_expert(manifest: Manifest, domain: str, version: int | None = None) -> Manifest:
    """Drop a domain's expert (only ``version`` if given). Idempotent."""
    current = manifest.experts.get(domain)
    if current is None or (version is not None and current.version != version):
        return manifest
    experts = {d: e for d, e in manifest.experts.items() if d != domain}
    return _bumped(manifest, experts=experts)

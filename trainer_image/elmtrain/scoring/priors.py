"""The forest's cached prior, read from storage where this manifest revision already has it
for the same text, else computed (the mean posterior of a text sample, DESIGN §1) and stored.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import structlog
from pydantic import ValidationError

from elmcore.errors import BadInputError, ElmError, NotFoundError
from elmcore.manifest import Manifest
from elmcore.priors import (
    PriorQuestion,
    StoredPrior,
    default_prior_locations,
    experts_of,
    prior_key,
)
from elmtrain.data.order import sample_sequences
from elmtrain.forest import Forest
from elmtrain.model.files import context_length_of
from elmtrain.runtime import Runtime

log = structlog.get_logger(__name__)


def forest_prior(
    forest: Forest,
    data: Sequence[str],
    sample: int,
    seq_len: int,
    runtime: Runtime,
    seed: int = 0,
    only: Collection[str] | None = None,
) -> dict[str, float]:
    """P(D = domain) over the merged experts for text like ``data`` (empty: the experts'
    validation text, else uniform), once per manifest revision. ``only``: over these experts
    alone (the others are neither run nor their text read), stored under a key of its own."""
    manifest = forest.manifest()
    experts = [e for e in manifest.sorted_experts() if only is None or e.domain in only]
    if not experts:
        raise BadInputError("the forest has no experts yet" if only is None else "no expert left")
    subset = None if len(experts) == len(manifest.experts) else [e.domain for e in experts]
    uniform = {e.domain: 1.0 / len(experts) for e in experts}
    if data:
        return _stored_or_computed(
            forest, manifest, subset, list(data), sample, seq_len, runtime, seed
        )
    locations = default_prior_locations(manifest, subset)
    if not locations:
        log.info("prior.uniform", reason="no prior data given and no validation text recorded")
        return uniform
    try:
        return _stored_or_computed(
            forest, manifest, subset, locations, sample, seq_len, runtime, seed
        )
    except ElmError as error:
        # The experts' validation text as their Jobs read it may not be readable here (a
        # serving pod's credentials, a training machine's path): not a reason to stop.
        log.warning("prior.uniform", reason=f"validation text unreadable: {error}")
        return uniform


def _stored_or_computed(
    forest: Forest,
    manifest: Manifest,
    subset: list[str] | None,
    locations: list[str],
    sample: int,
    seq_len: int,
    runtime: Runtime,
    seed: int,
) -> dict[str, float]:
    from elmtrain.scoring.evaluation import domain_prior

    experts = [e for e in manifest.sorted_experts() if subset is None or e.domain in subset]
    # Windows no longer than the experts read (a default of 128 on a 64-token model); one
    # expert's config says it, and a stored prior needs no other expert fetched.
    seq_len = min(seq_len, context_length_of(forest.fetch(experts[0])) or seq_len)
    store = forest.token_store()
    question = PriorQuestion(
        data=store.sources(locations), sample=sample, seq_len=seq_len, seed=seed, experts=subset
    )
    key = prior_key(manifest.revision, question)
    try:
        stored = StoredPrior.model_validate_json(forest.storage.read_bytes(key))
        if stored.experts == experts_of(manifest, subset) and stored.question == question:
            log.info("prior.stored", key=key)
            return stored.weights
    except (NotFoundError, ValidationError):
        pass
    sequences = sample_sequences(store.sequences(locations, seq_len), sample, seed)
    weights = domain_prior([forest.fetch(e) for e in experts], sequences, runtime)
    prior = StoredPrior(
        revision=manifest.revision,
        experts=experts_of(manifest, subset),
        question=question,
        weights={e.domain: w for e, w in zip(experts, weights, strict=True)},
    )
    if runtime.is_main:
        # Deterministic for its key: two replicas racing write the same bytes. A cache: where
        # the credentials may not write it (a server's read-mostly Secret), computed each time.
        try:
            forest.storage.write_bytes(key, prior.model_dump_json(indent=1).encode())
        except ElmError as error:
            log.warning("prior.not_stored", key=key, error=str(error)[:400])
    log.info("prior.computed", key=key, weights=prior.weights)
    return prior.weights

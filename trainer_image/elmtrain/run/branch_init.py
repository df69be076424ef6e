"""A new expert's starting point: the seed, a copy, or a (posterior-)weighted average (BTM)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import torch.distributed as dist

from elmcore.btm import InitStrategy, init_weights
from elmcore.manifest import Manifest
from elmcore.records import Parent
from elmtrain.forest import Forest
from elmtrain.model.averaging import average_models
from elmtrain.runtime import Runtime
from elmtrain.scoring.evaluation import domain_prior

log = structlog.get_logger(__name__)


@dataclass
class BranchInit:
    model_dir: Path
    parents: list[Parent]
    prior: dict[str, float]


def initialize(
    forest: Forest,
    manifest: Manifest,
    domain: str,
    strategy: InitStrategy,
    sample: torch.Tensor,
    runtime: Runtime,
    workdir: Path,
    k: int | None = None,
    copy_from: str | None = None,
) -> BranchInit:
    # A retrained domain does not start from its own older version: that would just continue it.
    experts = [e for e in manifest.sorted_experts() if e.domain != domain]
    dirs = {e.domain: forest.fetch(e) for e in experts}
    prior: dict[str, float] = {}
    if strategy is InitStrategy.POSTERIOR and experts:
        prior = dict(zip(dirs, _prior(list(dirs.values()), sample, runtime), strict=True))
        log.info("branch.prior", domain=domain, prior={d: round(w, 4) for d, w in prior.items()})
    weights = init_weights(strategy, list(dirs), prior=prior, k=k, copy_from=copy_from)
    if not weights:
        return BranchInit(forest.seed_dir(), [Parent(kind="seed", weight=1.0)], prior)
    parents = [
        Parent(kind="expert", domain=d, version=manifest.experts[d].version, weight=w)
        for d, w in weights.items()
    ]
    if len(weights) == 1:
        return BranchInit(dirs[next(iter(weights))], parents, prior)
    out = workdir / "init"
    average_models([dirs[d] for d in weights], list(weights.values()), out)
    return BranchInit(out, parents, prior)


def _prior(model_dirs: list[Path], sample: torch.Tensor, runtime: Runtime) -> list[float]:
    """The posterior prior, scored by rank 0 alone and sent to the others.

    Scoring loads each expert whole; on every rank that would be one model per rank on a node
    again, which sharded loading exists to avoid (issue 27 point 2). The others wait for it.
    """
    prior: list[list[float] | None] = [None]
    if runtime.is_main:
        prior[0] = domain_prior(model_dirs, sample, runtime)
        log.info("branch.prior_scored", rank=runtime.rank, experts=len(model_dirs))
    if runtime.distributed:
        dist.broadcast_object_list(prior, src=0, device=runtime.device)
    assert prior[0] is not None
    return prior[0]

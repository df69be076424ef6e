"""How big a discovery run is: BTM quality's model and budget, the cluster counts, the fit."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.btm import scale as btm_scale
from bench.btm.scale import Scale

POOLED = "pooled"  # the corpus folder of the pooled, unlabeled training text

# The shared corpus' eight training domains (devil is the evaluation-only one).
TRAINING_DOMAINS = (
    "changelogs",
    "code",
    "dictionary",
    "legal",
    "manuals",
    "perldocs",
    "quotes",
    "scripture",
)


@dataclass(frozen=True)
class DiscoveryScale:
    """``btm.first``: the labelled domains pooled (and the labelled forest's experts);
    ``btm.ood``: never trained on; model, batch, budget and evaluation sizes as ``btm``'s."""

    btm: Scale
    cluster_counts: tuple[int, ...]  # k of each cluster forest
    validation_fraction: float  # each cluster's share kept as its branch's validation text
    fit_sample: int  # documents the clusterer is fitted on (cluster-fit --sample)
    max_features: int  # tf-idf vocabulary (cluster-fit --max-features)
    temperature: float = 0.1  # c-BTM's routing temperature
    cost_repeats: int = 3  # timed passes of the cost measurement

    @property
    def domains(self) -> tuple[str, ...]:
        return self.btm.first

    @property
    def half_budget(self) -> int:
        """What each forest spends after the shared seed: its experts' steps together, or the
        dense model's continued training (compute matched)."""
        return self.btm.total_steps - self.btm.seed_steps(self.btm.main_fraction)

    def expert_steps(self, experts: int) -> int:
        return self.half_budget // experts


def labelled(scale: Scale, domains: tuple[str, ...]) -> Scale:
    """BTM quality's scale over ``domains``, nothing held out but the corpus' ``ood``."""
    return replace(
        scale,
        first=domains,
        new=(),
        held_out=(),
        fractions=(scale.main_fraction,),
        domain_counts=(),
        count_order=domains,
    )


FULL = DiscoveryScale(
    btm=labelled(btm_scale.FULL, TRAINING_DOMAINS),
    cluster_counts=(2, 4, 8),
    validation_fraction=0.02,
    fit_sample=10_000,
    max_features=50_000,
)
QUICK = DiscoveryScale(
    btm=labelled(btm_scale.QUICK, ("code", "legal", "scripture", "quotes")),
    cluster_counts=(2, 4),
    validation_fraction=0.1,
    fit_sample=1_000,
    max_features=5_000,
    cost_repeats=1,
)

"""What the benchmark trains, in the order it trains it; each returns the forests' folders.

Main comparison, per training seed s (seed fraction f of the budget T):
    seed      f*T steps on the mixture of the trained domains
    first     one expert per ``first`` domain, branched from the seed (BTM's parallel stage)
    incr-X    ``first`` plus one expert per ``new`` domain, initialised by strategy X from the
              first stage's experts (posterior = the operator's default, the main forest)
    dense     the seed trained on for as many steps as all the experts together
    random    as many experts as domains, each on a random split of the pooled mixture
Every expert of a forest gets (1-f)*T / (number of trained domains) steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from bench.btm.recipes import Recipes, copy_forest, random_splits

log = structlog.get_logger(__name__)
MAIN_STRATEGY = "posterior"


@dataclass(frozen=True)
class Grown:
    seed: Path  # the seed alone
    first: Path  # the parallel stage
    incremental: dict[str, Path]  # strategy -> the forest whose new experts it initialised

    @property
    def forest(self) -> Path:
        return self.incremental[MAIN_STRATEGY]


@dataclass(frozen=True)
class MainRun:
    training_seed: int
    grown: Grown
    dense: Path
    random: Path


def grow(
    recipes: Recipes,
    template: Path,
    root: Path,
    fraction: float,
    seed: int,
    strategies: tuple[str, ...],
) -> Grown:
    scale = recipes.scale
    steps = scale.expert_steps(fraction, len(scale.trained))
    log.info("btm.grow", forest=root.name, fraction=fraction, seed=seed, expert_steps=steps)
    seeded, first = root / "seed", root / "first"
    recipes.seed(template, seeded, scale.trained, scale.seed_steps(fraction), seed)
    copy_forest(seeded, first)
    recipes.experts(first, scale.first, steps, seed)
    incremental = {}
    for strategy in strategies:
        incremental[strategy] = root / f"incr-{strategy}"
        copy_forest(first, incremental[strategy])
        recipes.experts(
            incremental[strategy], scale.new, steps, seed, strategy=strategy, curve=True
        )
    return Grown(seeded, first, incremental)


def main_run(recipes: Recipes, template: Path, work: Path, seed: int) -> MainRun:
    scale = recipes.scale
    root = work / f"main-s{seed}"
    grown = grow(recipes, template, root, scale.main_fraction, seed, scale.strategies)
    experts = len(scale.trained)
    steps = scale.expert_steps(scale.main_fraction, experts)
    dense = root / "dense"
    recipes.dense(grown.seed, dense, scale.trained, steps * experts, seed)
    control = root / "random"
    copy_forest(grown.seed, control)
    for i, split in enumerate(random_splits(recipes.corpus, scale.trained, experts, seed, root)):
        recipes.branch(
            control,
            f"split-{i}",
            [str(split / "train.txt")],
            [str(split / "valid.txt")],
            steps,
            seed,
        )
    return MainRun(seed, grown, dense, control)


def sweep_forest(
    recipes: Recipes, template: Path, work: Path, fraction: float, main: MainRun
) -> Path:
    """The main recipe (first stage, then posterior-initialised new experts) at another seed
    fraction, training seed 0; the main fraction is the main run's own forest."""
    if fraction == recipes.scale.main_fraction:
        return main.grown.forest
    root = work / f"sweep-f{round(fraction * 100)}"
    return grow(recipes, template, root, fraction, main.training_seed, (MAIN_STRATEGY,)).forest


def count_forest(recipes: Recipes, template: Path, work: Path, domains: int) -> tuple[Path, Path]:
    """The same budget over the first ``domains`` of ``count_order``: seed, one expert per
    domain from the seed, and the compute-matched dense model (training seed 0)."""
    scale = recipes.scale
    chosen = scale.count_order[:domains]
    root = work / f"count-{domains}"
    steps = scale.expert_steps(scale.main_fraction, domains)
    log.info("btm.count", forest=root.name, domains=chosen, expert_steps=steps)
    seeded, forest, dense = root / "seed", root / "forest", root / "dense"
    recipes.seed(template, seeded, chosen, scale.seed_steps(scale.main_fraction), 0)
    copy_forest(seeded, forest)
    recipes.experts(forest, chosen, steps, 0)
    recipes.dense(seeded, dense, chosen, steps * domains, 0)
    return forest, dense

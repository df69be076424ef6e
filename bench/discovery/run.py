"""Domains found, not given (c-BTM) on the shared corpus: docs/discovery.md, docs/benchmarks.md.

    python -m bench.discovery            # the full run (about 32 min on 2 CPU cores)
    python -m bench.discovery --quick    # tiny model, four domains (< 2 min): the pipeline only
    python -m bench.discovery --work DIR # keep the models; a rerun trains only what is missing

The eight training domains' train documents are pooled and shuffled, their labels removed; per
training seed (bench/discovery/forests.py) one seed model on the pooled text, then at equal
compute: the labelled forest (one expert per domain), a forest of k = 2, 4, 8 clusters
(``elmtrain cluster-fit``/``cluster-assign``, one expert per cluster with ``--cluster``), and
the dense model. Scored on each domain's test text and on ``devil`` (never trained on, the
tokenizer included): posterior and cluster routing, with their cost per token, and the
clusters' normalised mutual information with the hidden labels.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.btm import analysis
from bench.btm.evaluate import DENSE, SEED, Evaluator, Rows
from bench.btm.recipes import Recipes
from bench.btm_quality import _prepare_corpus
from bench.common import ROOT, Laps, parser, run_in_work
from bench.discovery import evaluate
from bench.discovery.forests import SeedRun, pooled_corpus, train_seed
from bench.discovery.report import claims, markdown, plot
from bench.discovery.scale import FULL, POOLED, QUICK, DiscoveryScale, labelled


def seed_rows(
    evaluator: Evaluator, scale: DiscoveryScale, run_: SeedRun, costs: evaluate.Costs
) -> Rows:
    domains = scale.btm.evaluated
    rows = evaluate.single_rows(
        evaluator,
        {SEED: evaluator.models(run_.seed)[0], DENSE: evaluator.models(run_.dense)[1]["dense"]},
        domains,
        costs,
    )
    rows |= evaluate.forest_rows(evaluator, run_.labelled, evaluate.LABELLED, domains, costs)
    for k, forest in run_.clustered.items():
        name = evaluate.forest_name(k)
        rows |= evaluate.forest_rows(evaluator, forest, name, domains, costs, scale.temperature)
    return rows


def run(corpus: Path, scale: DiscoveryScale, work: Path) -> dict[str, Any]:
    btm = scale.btm
    corpus = pooled_corpus(_prepare_corpus(corpus, btm, work), scale.domains, work)
    recipes = Recipes(corpus, btm)
    groups: dict[str, tuple[str, ...]] = {"in-domain": scale.domains, btm.ood: (btm.ood,)}
    lap = Laps()

    # One tokenizer, on the pooled text: devil stays unseen.
    template = work / "template"
    recipes.tokenizer(template, (POOLED,))
    evaluator = Evaluator(corpus, template, btm)
    costs = evaluate.Costs()
    per_seed: dict[int, Rows] = {}
    found: dict[int, dict[str, Any]] = {}
    expert_ms = None
    for seed in btm.training_seeds:
        run_ = train_seed(recipes, scale, template, work, seed)
        lap(f"train seed {seed}")
        per_seed[seed] = seed_rows(evaluator, scale, run_, costs)
        found[seed] = {
            str(k): evaluate.clusters_found(corpus, forest, k)
            for k, forest in run_.clustered.items()
        }
        if expert_ms is None:
            dense = evaluator.models(run_.dense)[1]["dense"]
            expert_ms = evaluate.expert_ms_per_token(
                evaluator, dense, scale.domains[0], scale.cost_repeats
            )
        lap(f"evaluate seed {seed}")
    evaluator.close()
    rows = list(per_seed.values())
    nmi = {
        str(k): analysis.spread([found[s][str(k)]["nmi"] for s in btm.training_seeds])
        for k in scale.cluster_counts
    }
    return {
        "scale": asdict(scale),
        "scale_domains": list(btm.evaluated),
        "steps": {
            "seed": btm.seed_steps(btm.main_fraction),
            "after_seed": scale.half_budget,
            "expert": {str(k): scale.expert_steps(k) for k in scale.cluster_counts}
            | {evaluate.LABELLED: scale.expert_steps(len(scale.domains))},
        },
        "seconds": lap.seconds,
        "groups": groups,
        "per_seed": per_seed,
        "spread": analysis.across_seeds(rows, groups),
        "orderings": [
            check
            for claim, better, worse in claims(scale)
            for check in analysis.ordering(claim, better, worse, rows, groups)
        ],
        "clusters": {"per_seed": found, "nmi": nmi},
        "cost": {
            "expert_ms_per_token": expert_ms,
            "rows": costs.summary(expert_ms or 0.0),
        },
    }


def _scale(args: Any) -> DiscoveryScale:
    scale = QUICK if args.quick else FULL
    if args.domains or args.ood:
        domains = tuple(args.domains.split(",")) if args.domains else scale.domains
        btm = replace(labelled(scale.btm, domains), ood=args.ood or scale.btm.ood)
        scale = replace(scale, btm=btm)
    if args.clusters:
        scale = replace(scale, cluster_counts=tuple(int(k) for k in args.clusters.split(",")))
    return scale


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--domains", help="comma-separated labelled domains, pooled unlabeled")
    cli.add_argument("--ood", help="the evaluation-only domain (default: devil)")
    cli.add_argument("--clusters", help="comma-separated cluster counts (default: 2,4,8)")
    cli.add_argument("--work", type=Path, help="keep the forests here (default: a temp folder)")
    args = cli.parse_args(argv)
    scale = _scale(args)
    return run_in_work(
        "discovery",
        args,
        scale.btm.evaluated,
        lambda work: run(args.corpus, scale, work),
        plot,
        markdown,
    )

"""BTM quality on the shared corpus, as the paper measures it (docs/benchmarks.md).

    python -m bench.btm_quality            # the full run (under 2 h on 2 CPU cores)
    python -m bench.btm_quality --quick    # tiny model, few domains (< 2 min): the pipeline only
    python -m bench.btm_quality --work DIR # keep the models; a rerun trains only what is missing

What is trained (bench/btm/experiments.py), all with the real ``elmtrain`` commands:
1. per training seed: a seed, a first stage of experts branched from it, the new domains' experts
   branched from those by each init strategy (posterior, seed, nearest, uniform), a
   compute-matched dense model, and a random-split control forest;
2. the main recipe at other seed fractions (training seed 0);
3. the same budget spread over 2, 4 and 8 domains (training seed 0).
Held-out training domains and the corpus' ``devil`` are never trained on (tokenizer included).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.btm import analysis, experiments
from bench.btm.evaluate import (
    DENSE,
    ENSEMBLE,
    POSTERIOR_AVG,
    SEED,
    UNIFORM_AVG,
    Evaluator,
    main_rows,
    new_expert_scores,
    random_row,
)
from bench.btm.recipes import Recipes
from bench.btm.report import markdown, plot
from bench.btm.scale import FULL, QUICK, Scale
from bench.common import ROOT, Laps, parser, run_in_work

CLAIMS = (
    ("the ensemble beats the compute-matched dense model", ENSEMBLE, DENSE),
    ("the posterior-weighted average beats the uniform average", POSTERIOR_AVG, UNIFORM_AVG),
    ("domain experts beat random-split experts (ensemble)", ENSEMBLE, random_row(ENSEMBLE)),
    (
        "domain experts beat random-split experts (posterior average)",
        POSTERIOR_AVG,
        random_row(POSTERIOR_AVG),
    ),
)


def _groups(scale: Scale) -> dict[str, tuple[str, ...]]:
    """In-domain and held-out means, and each out-of-domain set on its own."""
    alone = scale.out_of_domain if len(scale.held_out) > 1 else (scale.ood,)
    return {"in-domain": scale.trained, "held-out": scale.held_out, **{d: (d,) for d in alone}}


def _scale(args: Any) -> Scale:
    scale = QUICK if args.quick else FULL
    names = {"first": args.first, "new": args.new, "held_out": args.held_out}
    overrides: dict[str, Any] = {k: tuple(v.split(",")) for k, v in names.items() if v}
    if args.ood:
        overrides["ood"] = args.ood
    if overrides:
        scale = replace(scale, **overrides)
        scale = replace(scale, count_order=(*scale.trained, *scale.held_out))
    return scale


def _prepare_corpus(corpus: Path, scale: Scale, work: Path) -> Path:
    """The corpus itself, or (quick) a copy of each file's first ``max_bytes`` at a document end."""
    if scale.max_bytes is None:
        return corpus
    copy = work / "corpus"
    for domain in {*scale.evaluated, *scale.count_order}:
        for split in ("train", "valid", "test"):
            text = (corpus / domain / f"{split}.txt").read_text()
            # A file within the limit is copied whole (cutting at its last separator would
            # drop its last document).
            cut = (
                len(text)
                if len(text) <= scale.max_bytes
                else text.rfind("\n\n\n", 0, scale.max_bytes)
            )
            (copy / domain).mkdir(parents=True, exist_ok=True)
            (copy / domain / f"{split}.txt").write_text(text[: cut if cut > 0 else scale.max_bytes])
    return copy


def run(corpus: Path, scale: Scale, work: Path) -> dict[str, Any]:
    recipes = Recipes(_prepare_corpus(corpus, scale, work), scale)
    groups = _groups(scale)
    lap = Laps()

    # The main comparison's tokenizer sees the trained domains only: held-out means unseen.
    template = work / "template"
    recipes.tokenizer(template, scale.trained)
    evaluator = Evaluator(recipes.corpus, template, scale)
    per_seed, incremental = {}, {}
    runs = {}
    for seed in scale.training_seeds:
        run_ = experiments.main_run(recipes, template, work, seed)
        runs[seed] = run_
        lap(f"train main seed {seed}")
        per_seed[seed] = main_rows(evaluator, run_.grown.forest, run_.dense, run_.random)
        incremental[seed] = {
            s: new_expert_scores(evaluator, f) for s, f in run_.grown.incremental.items()
        }
        lap(f"evaluate main seed {seed}")

    sweep: dict[str, Any] = {}
    main = runs[scale.training_seeds[0]]
    for fraction in scale.fractions:
        forest = experiments.sweep_forest(recipes, template, work, fraction, main)
        seed_dir, experts = evaluator.models(forest)
        rows = evaluator.expert_set(experts, scale.evaluated)
        rows[SEED] = {d: evaluator.perplexity(seed_dir, d) for d in scale.evaluated}
        sweep[f"{round(fraction * 100)}%"] = analysis.group_means(rows, groups)
    lap("seed-fraction sweep")
    evaluator.close()

    # The domain-count study trains on all of count_order: its own tokenizer.
    count_template = work / "template-count"
    recipes.tokenizer(count_template, scale.count_order)
    count_eval = Evaluator(recipes.corpus, count_template, scale)
    forests: dict[str, Any] = {}
    for n in scale.domain_counts:
        forest, dense = experiments.count_forest(recipes, count_template, work, n)
        chosen = scale.count_order[:n]
        count_groups = {"in-domain": chosen, scale.ood: (scale.ood,)}
        domains = (*chosen, scale.ood)
        rows = count_eval.expert_set(count_eval.models(forest)[1], domains)
        dense_dir = count_eval.models(dense)[1]["dense"]
        rows[DENSE] = {d: count_eval.perplexity(dense_dir, d) for d in domains}
        forests[str(n)] = {
            "domains": chosen,
            "rows": rows,
            "means": analysis.group_means(rows, count_groups),
        }
    count_eval.close()
    lap("domain count")

    seeds_rows = list(per_seed.values())
    strategies = scale.strategies
    return {
        "scale": asdict(scale),
        "scale_domains": list(scale.evaluated),
        "seconds": lap.seconds,
        "main": {
            "groups": groups,
            "per_seed": per_seed,
            "spread": analysis.across_seeds(seeds_rows, groups),
            "orderings": [
                check
                for claim, better, worse in CLAIMS
                for check in analysis.ordering(claim, better, worse, seeds_rows, groups)
            ],
        },
        "incremental": {
            "per_seed": incremental,
            "analysis": analysis.incremental(
                list(incremental.values()), strategies[0], strategies[1:]
            ),
        },
        "sweep": {
            "means": sweep,
            "optimum": {
                g: analysis.optimum({f: rows[ENSEMBLE][g] for f, rows in sweep.items()})
                for g in groups
            },
        },
        "domain_count": {
            "forests": forests,
            "advantage": {
                g: analysis.advantage_by_count(
                    {
                        n: {k: f["means"][k][g] for k in (ENSEMBLE, DENSE)}
                        for n, f in forests.items()
                    }
                )
                for g in ("in-domain", scale.ood)
            },
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--first", help="comma-separated domains of the first stage")
    cli.add_argument("--new", help="comma-separated domains added incrementally")
    cli.add_argument("--held-out", help="comma-separated training domains nobody trains on")
    cli.add_argument("--ood", help="the evaluation-only domain (default: devil)")
    cli.add_argument("--work", type=Path, help="keep the forests here (default: a temp folder)")
    args = cli.parse_args(argv)
    scale = _scale(args)
    domains = {*scale.evaluated, *scale.count_order}
    return run_in_work(
        "btm_quality", args, domains, lambda work: run(args.corpus, scale, work), plot, markdown
    )


if __name__ == "__main__":
    main()

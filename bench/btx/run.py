"""Branch-Train-MiX against BTM and dense on the shared corpus (docs/btx.md).

    python -m bench.btx            # BTM quality's size (38 min on 2 quiet CPU cores)
    python -m bench.btx --small    # the first, smaller run: d64 x 2, context 64, 1,280 steps
    python -m bench.btx --quick    # tiny model, few domains (< 2 min): the pipeline only
    python -m bench.btx --work DIR # keep the models; a rerun trains only what is missing
    python -m bench.btx --small --total-steps 2400 --finetune-steps 240  # its step budget

Per training seed (bench/btx/forests.py): a Llama-family seed and one expert per domain (BTM),
the compute-matched dense model, and the forest mixed into a top-2 Mixtral model by router
init (centroids, random), each before and after finetuning. All are scored on the test text of
the mixed domains, the two held-out training domains and ``devil`` (never trained on, tokenizer
included); the inference cost is measured on training seed 0's models.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.btm import analysis
from bench.btm.evaluate import DENSE, Evaluator, Rows
from bench.btm.recipes import Recipes
from bench.btm_quality import _prepare_corpus
from bench.btx import cost
from bench.btx.forests import ROUTERS, SeedRun, train_seed
from bench.btx.report import CLAIMS, markdown, mix_row, plot
from bench.btx.scale import FULL, QUICK, SMALL, BtxScale
from bench.common import ROOT, Laps, parser, run_in_work


def groups_of(scale: BtxScale) -> dict[str, tuple[str, ...]]:
    btm = scale.btm
    return {
        "in-domain": btm.first,
        "held-out": btm.held_out,
        **{d: (d,) for d in btm.out_of_domain},
    }


def seed_rows(evaluator: Evaluator, run_: SeedRun) -> Rows:
    domains = evaluator.scale.evaluated
    _, experts = evaluator.models(run_.forest)
    rows = evaluator.expert_set(experts, domains)
    dense = evaluator.models(run_.dense)[1]["dense"]
    rows[DENSE] = {d: evaluator.perplexity(dense, d) for d in domains}
    for router in ROUTERS:
        for finetuned, folder in ((False, run_.mixes[router]), (True, run_.finetuned[router])):
            rows[mix_row(router, finetuned)] = {d: evaluator.perplexity(folder, d) for d in domains}
    return rows


def inference_cost(evaluator: Evaluator, scale: BtxScale, run_: SeedRun) -> dict[str, Any]:
    import torch

    from elmtrain.model.averaging import average_models
    from elmtrain.scoring.evaluation import domain_prior

    _, experts = evaluator.models(run_.forest)
    dirs = list(experts.values())
    domain = scale.btm.first[0]
    prior = torch.tensor(
        domain_prior(dirs, evaluator.text(domain, "valid"), evaluator.runtime), dtype=torch.float64
    )
    with tempfile.TemporaryDirectory(prefix="btx-cost-") as tmp:
        average = Path(tmp) / "uniform"
        average_models(dirs, [1.0] * len(dirs), average)
        measured = cost.measure(
            evaluator.models(run_.dense)[1]["dense"],
            average,
            dirs,
            run_.finetuned["centroids"],
            prior,
            evaluator.text(domain, "test")[: scale.cost_sequences],
            scale.new_tokens,
            scale.repeats,
            evaluator.runtime,
        )
    return {"domain": domain, **measured}


def run(corpus: Path, scale: BtxScale, work: Path) -> dict[str, Any]:
    btm = scale.btm
    recipes = Recipes(_prepare_corpus(corpus, btm, work), btm)
    groups = groups_of(scale)
    lap = Laps()

    template = work / "template"  # the mixed domains' tokenizer: held-out text is unseen
    recipes.tokenizer(template, btm.first)
    evaluator = Evaluator(recipes.corpus, template, btm)
    per_seed, runs = {}, {}
    for seed in btm.training_seeds:
        runs[seed] = train_seed(recipes, scale, template, work, seed)
        lap(f"train seed {seed}")
        per_seed[seed] = seed_rows(evaluator, runs[seed])
        lap(f"evaluate seed {seed}")
    measured = inference_cost(evaluator, scale, runs[btm.training_seeds[0]])
    lap("inference cost")
    evaluator.close()
    rows = list(per_seed.values())
    return {
        "scale": asdict(scale),
        "scale_domains": list(btm.evaluated),
        "steps": {
            "seed": btm.seed_steps(btm.main_fraction),
            "expert": scale.expert_steps,
            "experts": len(btm.first),
            "finetune": scale.finetune_steps,
            "dense": scale.dense_steps,
        },
        "seconds": lap.seconds,
        "groups": groups,
        "per_seed": per_seed,
        "spread": analysis.across_seeds(rows, groups),
        "orderings": [
            check
            for claim, better, worse in CLAIMS
            for check in analysis.ordering(claim, better, worse, rows, groups)
        ],
        "cost": measured,
    }


def _scale(args: Any) -> BtxScale:
    scale = QUICK if args.quick else SMALL if args.small else FULL
    names = {"first": args.domains, "held_out": args.held_out}
    overrides: dict[str, Any] = {k: tuple(v.split(",")) for k, v in names.items() if v}
    if args.ood:
        overrides["ood"] = args.ood
    if args.total_steps:
        overrides["total_steps"] = args.total_steps
    if overrides:
        btm = replace(scale.btm, **overrides)
        scale = replace(scale, btm=replace(btm, count_order=btm.first))
    if args.finetune_steps:
        scale = replace(scale, finetune_steps=args.finetune_steps)
    return scale


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--small", action="store_true", help="the first, smaller run (docs/btx.md)")
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--domains", help="comma-separated domains of the experts mixed")
    cli.add_argument("--held-out", help="comma-separated training domains nobody trains on")
    cli.add_argument("--ood", help="the evaluation-only domain (default: devil)")
    cli.add_argument("--work", type=Path, help="keep the models here (default: a temp folder)")
    cli.add_argument("--total-steps", type=int, help="one forest's steps, seed + experts")
    cli.add_argument("--finetune-steps", type=int, help="each mix's finetuning steps")
    args = cli.parse_args(argv)
    scale = _scale(args)
    return run_in_work(
        "btx", args, scale.btm.evaluated, lambda work: run(args.corpus, scale, work), plot, markdown
    )

"""``elmtrain ensemble-eval``: perplexity of the posterior-weighted ensemble of all experts.

The prior of each target domain is its cached prior (from ``--prior-data``, held-out text of
that domain) or uniform; the posterior is then updated token by token as the context grows.
For each ``--top-k`` k, two rows: ``top<k>`` keeps the k most probable experts at each position
(every expert runs), ``routed<k>`` runs only the k experts with the largest prior.
"""

from __future__ import annotations

import argparse
from typing import Any

from elmcore.errors import BadInputError
from elmtrain.commands.common import add_forest_args, domain_locations, open_forest, write_output
from elmtrain.commands.evaluate import add_eval_data_args
from elmtrain.commands.posterior import prior_for


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("ensemble-eval", help="perplexity of the posterior ensemble")
    add_forest_args(parser)
    add_eval_data_args(parser)
    parser.add_argument("--prior-data", nargs="*", default=[], help="[domain=]location ...")
    parser.add_argument("--prior-sample", type=int, default=100)
    parser.add_argument("--top-k", type=int, nargs="*", default=[], help="also report top-k")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    # torch and transformers: only when it runs (see elmtrain.cli).
    import torch

    from elmtrain.data.store import load_sequences
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.evaluation import expert_logprobs
    from elmtrain.scoring.logprobs import ensemble_logprobs, perplexity, route

    forest = open_forest(args)
    runtime = setup_runtime()
    experts = forest.manifest().sorted_experts()
    if not experts:
        raise BadInputError("the forest has no experts yet")
    names = [e.domain for e in experts]
    dirs = [forest.fetch(e) for e in experts]
    store = forest.token_store()
    prior_data = domain_locations(args.prior_data)
    report: dict[str, Any] = {"experts": names, "domains": {}}
    for domain, location in domain_locations(args.data).items():
        if domain in prior_data:
            prior_map = prior_for(
                forest, [prior_data[domain]], args.prior_sample, args.seq_len, 0, runtime
            )
            prior = [prior_map[n] for n in names]
        else:
            prior = [1.0 / len(names)] * len(names)
        sequences = load_sequences([location], store, args.seq_len, args.max_sequences)
        logprobs = expert_logprobs(dirs, sequences, runtime)
        prior_t = torch.tensor(prior, dtype=torch.float64)
        entry: dict[str, Any] = {"prior": dict(zip(names, prior, strict=True))}
        rows = {"full": ensemble_logprobs(logprobs, prior_t)}
        for k in args.top_k:
            rows[f"top{k}"] = ensemble_logprobs(logprobs, prior_t, k)
            chosen = route(prior_t, k)
            rows[f"routed{k}"] = ensemble_logprobs(logprobs[chosen], prior_t[chosen])
        for row, mixture in rows.items():
            loss, ppl, tokens = perplexity(mixture)
            entry[row] = {"loss": loss, "perplexity": ppl, "tokens": tokens}
        report["domains"][domain] = entry
    write_output(report, args.out, forest.endpoint)
    return report

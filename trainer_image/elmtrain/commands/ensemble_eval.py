"""``elmtrain ensemble-eval``: perplexity of the posterior-weighted ensemble of all experts.

The prior of each target domain is its cached prior (from ``--prior-data``, held-out text of
that domain) or uniform; the posterior is then updated token by token as the context grows.
For each ``--top-k`` k, two rows: ``top<k>`` keeps the k most probable experts at each position
(every expert runs), ``routed<k>`` runs only the k experts with the largest prior.

``--routing clusters`` (c-BTM; docs/clustering.md) adds a ``clusters`` row: each position mixes
the experts by the cluster weights of the text before it (elmtrain.clusters.routing), the
``--cluster-top-k`` nearest kept. Every row reports ``experts_per_token``, the experts a router
would run per scored token (full and top-k: all of them; routed: k; clusters: those with a
weight there); the ``clusters`` row also ``experts_per_sequence`` (those weighted anywhere in a
sequence: what runs with a KV cache) and ``routing_ms_per_token`` (tf-idf features and weights).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from elmcore.errors import BadInputError
from elmtrain.clusters.routing import DEFAULT_TEMPERATURE
from elmtrain.commands.common import add_forest_args, domain_locations, open_forest, write_output
from elmtrain.commands.evaluate import add_eval_data_args
from elmtrain.commands.posterior import prior_for

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

    from elmtrain.clusters.routing import ClusterRouter


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("ensemble-eval", help="perplexity of the posterior ensemble")
    add_forest_args(parser)
    add_eval_data_args(parser)
    parser.add_argument("--prior-data", nargs="*", default=[], help="[domain=]location ...")
    parser.add_argument("--prior-sample", type=int, default=100)
    parser.add_argument("--top-k", type=int, nargs="*", default=[], help="also report top-k")
    add_cluster_routing_args(parser)
    parser.set_defaults(func=run)


def add_cluster_routing_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--routing",
        choices=["posterior", "clusters"],
        default="posterior",
        help="clusters: also mix the experts by their clusters' weights for each context (c-BTM)",
    )
    parser.add_argument(
        "--cluster-temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"routing by cluster: softmax temperature (default {DEFAULT_TEMPERATURE}, c-BTM's)",
    )
    parser.add_argument(
        "--cluster-top-k", type=int, default=None, help="routing by cluster: keep the k nearest"
    )


def check_cluster_routing_args(args: argparse.Namespace) -> None:
    if not args.cluster_temperature > 0 or args.cluster_temperature == float("inf"):
        raise BadInputError(f"--cluster-temperature {args.cluster_temperature}: must be > 0")
    if args.cluster_top_k is not None and args.cluster_top_k < 1:
        raise BadInputError(f"--cluster-top-k {args.cluster_top_k}: must be >= 1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_cluster_routing_args(args)
    forest = open_forest(args)
    experts = forest.manifest().sorted_experts()
    if not experts:
        raise BadInputError("the forest has no experts yet")
    router = None
    if args.routing == "clusters":  # refused before torch is imported or an expert fetched
        from elmtrain.clusters.store import load_router

        router = load_router(forest.storage, experts)
    # torch and transformers: only when it runs (see elmtrain.cli).
    import torch

    from elmtrain.data.store import load_sequences
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.evaluation import expert_logprobs
    from elmtrain.scoring.logprobs import ensemble_logprobs, perplexity, route

    runtime = setup_runtime()
    tokenizer = forest.tokenizer() if router is not None else None
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
        run_per_token = {"full": len(names)}
        for k in args.top_k:
            rows[f"top{k}"] = ensemble_logprobs(logprobs, prior_t, k)
            chosen = route(prior_t, k)
            rows[f"routed{k}"] = ensemble_logprobs(logprobs[chosen], prior_t[chosen])
            run_per_token |= {f"top{k}": len(names), f"routed{k}": len(chosen)}
        for row, mixture in rows.items():
            loss, ppl, tokens = perplexity(mixture)
            entry[row] = {
                "loss": loss,
                "perplexity": ppl,
                "tokens": tokens,
                "experts_per_token": float(run_per_token[row]),
            }
        if router is not None and tokenizer is not None:
            entry["clusters"] = _cluster_row(args, router, tokenizer, sequences, logprobs, names)
        report["domains"][domain] = entry
    if router is not None:
        report["routing"] = {
            "clusters": router.experts.set,
            "clusterer_sha256": router.experts.clusterer_sha256,
            "temperature": args.cluster_temperature,
            "top_k": args.cluster_top_k,
        }
    write_output(report, args.out, forest.endpoint)
    return report


def _cluster_row(
    args: argparse.Namespace,
    router: ClusterRouter,
    tokenizer: PreTrainedTokenizerFast,
    sequences: torch.Tensor,
    logprobs: torch.Tensor,
    names: list[str],
) -> dict[str, Any]:
    """The mixture weighted, at each position, by the clusters of the text before it."""
    from elmtrain.scoring.clustered import cluster_mixture
    from elmtrain.scoring.logprobs import perplexity

    mixed = cluster_mixture(
        router, tokenizer.decode, sequences, logprobs, args.cluster_temperature, args.cluster_top_k
    )
    loss, ppl, tokens = perplexity(mixed.logprobs)
    return {
        "loss": loss,
        "perplexity": ppl,
        "tokens": tokens,
        "experts_per_token": mixed.experts_per_token() if tokens else 0.0,
        "experts_per_sequence": mixed.experts_per_sequence() if tokens else 0.0,
        "routing_ms_per_token": round(1000 * mixed.routing_seconds / max(tokens, 1), 4),
        "mean_weights": dict(zip(names, mixed.weights.double().mean((1, 2)).tolist(), strict=True)),
    }

"""``elmtrain eval``: perplexity of one model on one or more domains' text."""

from __future__ import annotations

import argparse
from typing import Any

from elmtrain.commands.common import add_forest_args, domain_locations, open_forest, write_output


def add_eval_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, help="[domain=]location ...")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-sequences", type=int, default=256, help="per domain")
    parser.add_argument("--out", help="also write the JSON report here")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("eval", help="perplexity of a model per domain")
    add_forest_args(parser)
    parser.add_argument("--model", default="seed", help="seed | expert:<domain> | location")
    add_eval_data_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    # torch and transformers: only when it runs (see elmtrain.cli).
    from elmtrain.data.store import load_sequences
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.evaluation import model_logprobs
    from elmtrain.scoring.logprobs import perplexity

    forest = open_forest(args)
    runtime = setup_runtime()
    store = forest.token_store()
    model_dir = forest.model_dir(args.model)
    report: dict[str, Any] = {"model": args.model, "domains": {}}
    for domain, location in domain_locations(args.data).items():
        sequences = load_sequences([location], store, args.seq_len, args.max_sequences)
        loss, ppl, tokens = perplexity(model_logprobs(model_dir, sequences, runtime))
        report["domains"][domain] = {"loss": loss, "perplexity": ppl, "tokens": tokens}
    write_output(report, args.out, forest.endpoint)
    return report

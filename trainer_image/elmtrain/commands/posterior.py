"""``elmtrain posterior``: the cached domain prior of a text sample over the forest's experts,
stored with the forest for the manifest's revision (``elmtrain.scoring.priors``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from elmcore.errors import BadInputError
from elmtrain.commands.common import add_forest_args, open_forest, write_output
from elmtrain.forest import Forest

if TYPE_CHECKING:
    from elmtrain.runtime import Runtime


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("posterior", help="cached domain prior P(D=j) of a text sample")
    add_forest_args(parser)
    parser.add_argument("--data", nargs="+", required=True, help="the target domain's text")
    parser.add_argument("--sample", type=int, default=100, help="sequences to average over")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", help="also write the JSON here")
    parser.set_defaults(func=run)


def prior_for(
    forest: Forest, data: list[str], sample: int, seq_len: int, seed: int, runtime: Runtime
) -> dict[str, float]:
    """The stored cached prior of this text for the current revision (computed if new)."""
    if not data:
        raise BadInputError("the prior needs text (--data)")
    from elmtrain.scoring.priors import forest_prior  # torch: only when it runs

    return forest_prior(forest, data, sample, seq_len, runtime, seed)


def run(args: argparse.Namespace) -> dict[str, float]:
    from elmtrain.runtime import setup_runtime  # torch: only when it runs

    forest = open_forest(args)
    prior = prior_for(forest, args.data, args.sample, args.seq_len, args.seed, setup_runtime())
    write_output(prior, args.out, forest.endpoint)
    return prior

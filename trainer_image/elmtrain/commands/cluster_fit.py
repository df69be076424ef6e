"""``elmtrain cluster-fit``: fit a cluster set's tf-idf + k-means clusterer (c-BTM) on a bounded
sample of its documents and commit it to the forest (``clusters/<set>/clusterer``).

The documents are streamed once through a reservoir: memory holds ``--sample`` documents and
their features, whatever the corpus's size. No torch, no tokenizer: a CPU Job.
"""

from __future__ import annotations

import argparse
from typing import Any

import structlog

from elmcore.errors import BadInputError
from elmcore.names import validate_label
from elmtrain.commands.common import add_forest_args, open_forest, write_output
from elmtrain.data.documents import iter_documents
from elmtrain.run.outcome import failure_recorded

log = structlog.get_logger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("cluster-fit", help="fit a cluster set's clusterer (c-BTM)")
    add_forest_args(parser)
    parser.add_argument("--set", required=True, dest="cluster_set", help="the cluster set's name")
    parser.add_argument(
        "--run-id", default=None, help="record bad input in this run's progress (the operator's)"
    )
    parser.add_argument("--data", nargs="+", required=True, help="text locations (unlabeled)")
    parser.add_argument("--clusters", type=int, required=True, help="k")
    parser.add_argument("--sample", type=int, default=10_000, help="documents used to fit")
    parser.add_argument("--max-features", type=int, default=50_000, help="tf-idf vocabulary")
    parser.add_argument("--ngram", default="1,1", help="n-gram range: min,max")
    parser.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def parse_ngram(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise BadInputError(f"--ngram {text!r} is not min,max") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise BadInputError(f"--ngram {text!r}: need 1 <= min <= max")
    return pair


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pydantic import ValidationError

    from elmtrain.clusters.fit import ClusterSettings, fit_clusterer
    from elmtrain.clusters.sample import Reservoir
    from elmtrain.clusters.store import save_clusterer

    name = validate_label(args.cluster_set, "cluster set")
    low, high = parse_ngram(args.ngram)
    try:
        settings = ClusterSettings(
            clusters=args.clusters,
            max_features=args.max_features,
            ngram_min=low,
            ngram_max=high,
            balance=args.balance,
            seed=args.seed,
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise BadInputError(f"cluster settings: {first['loc'][0]}: {first['msg']}") from None
    if args.sample < settings.clusters:
        raise BadInputError(f"--sample {args.sample} is smaller than --clusters {args.clusters}")
    forest = open_forest(args)
    with failure_recorded(forest, args.run_id):
        reservoir = Reservoir(args.sample, seed=args.seed).extend(
            iter_documents(args.data, forest.endpoint)
        )
        if reservoir.seen < settings.clusters:
            raise BadInputError(
                f"{', '.join(args.data)}: {reservoir.seen} documents, "
                f"fewer than {args.clusters} clusters"
            )
        clusterer, labels = fit_clusterer(reservoir.kept, settings)
        sha = save_clusterer(forest.storage, name, clusterer)
        sizes = [int((labels == c).sum()) for c in range(settings.clusters)]
        result = {
            "set": name,
            "sha256": sha,
            "clusters": settings.clusters,
            "documents_seen": reservoir.seen,
            "documents_fitted": clusterer.fitted_documents,
            "features": len(clusterer.vocabulary),
            "sample_sizes": sizes,
        }
        log.info("clusters.fitted", **result)
        write_output(result, None, None)
    return result

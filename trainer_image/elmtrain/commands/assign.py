"""``elmtrain assign``: print the cluster of each document of a file, one line per document in
order: the assignment ``cluster-assign`` makes, for anyone to inspect a cluster set."""

from __future__ import annotations

import argparse
import sys

from elmcore.names import validate_label
from elmtrain.commands.common import add_forest_args, open_forest
from elmtrain.data.documents import iter_documents


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("assign", help="print the cluster of each document of a file")
    add_forest_args(parser)
    parser.add_argument(
        "--set",
        required=True,
        dest="cluster_set",
        help="the cluster set: its storage name, or an ElmClusterSet's name if it has one version",
    )
    parser.add_argument("--data", nargs="+", required=True, help="text file(s) or locations")
    parser.add_argument("--sha256", default=None, help="refuse any other clusterer")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> list[int]:
    from elmtrain.clusters.partition import batches
    from elmtrain.clusters.store import load_clusterer, resolve_set

    forest = open_forest(args)
    name = resolve_set(forest.storage, validate_label(args.cluster_set, "cluster set"))
    clusterer, _ = load_clusterer(forest.storage, name, args.sha256)
    labels: list[int] = []
    for batch in batches(iter_documents(args.data, forest.endpoint)):
        found = clusterer.assign(batch).tolist()
        sys.stdout.write("".join(f"{label}\n" for label in found))
        labels += found
    return labels

"""``elmtrain average``: export one HF model as a weighted parameter average of experts."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elmcore.btm import top_k
from elmcore.errors import BadInputError
from elmcore.storage import open_storage
from elmcore.storage.commit import commit_dir
from elmtrain.cache import cache_dir
from elmtrain.clusters.routing import DEFAULT_TEMPERATURE
from elmtrain.commands.common import add_forest_args, open_forest, parse_weights, write_output

if TYPE_CHECKING:
    from elmcore.manifest import ExpertEntry
    from elmtrain.forest import Forest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("average", help="export a weighted parameter average of experts")
    add_forest_args(parser)
    parser.add_argument(
        "--weights",
        default="uniform",
        help="uniform | posterior (with --target-data) | clusters (with --target-data: the "
        "mean cluster weights of its documents, c-BTM) | domain=w,domain=w,...",
    )
    parser.add_argument(
        "--target-data", nargs="*", default=[], help="posterior, clusters: target text"
    )
    parser.add_argument(
        "--sample", type=int, default=100, help="posterior: sequences; clusters: documents"
    )
    parser.add_argument(
        "--cluster-temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"clusters: softmax temperature (default {DEFAULT_TEMPERATURE}, c-BTM's)",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=None, help="keep the k largest weights")
    parser.add_argument("--out", required=True, help="where to write the HF model folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    forest = open_forest(args)
    experts = {e.domain: e for e in forest.manifest().sorted_experts()}
    if not experts:
        raise BadInputError("the forest has no experts to average")
    if args.weights == "uniform":
        weights = dict.fromkeys(experts, 1.0)
    elif args.weights == "posterior":
        if not args.target_data:
            raise BadInputError("--weights posterior needs --target-data")
        # torch and transformers only for the posterior: a plain average never imports them.
        from elmtrain.commands.posterior import prior_for
        from elmtrain.runtime import setup_runtime

        weights = prior_for(forest, args.target_data, args.sample, args.seq_len, 0, setup_runtime())
    elif args.weights == "clusters":
        weights = _cluster_weights(args, forest, list(experts.values()))
    else:
        weights = parse_weights(args.weights)
        unknown = sorted(set(weights) - set(experts))
        if unknown:
            raise BadInputError(f"--weights names unknown experts {unknown}")
    from elmtrain.model.averaging import average_models  # numpy: not for --help

    names = list(weights)
    kept = top_k([weights[n] for n in names], args.top_k)  # None: all, normalised
    chosen = {n: w for n, w in zip(names, kept, strict=True) if w > 0}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp) / "average"
        average_models([forest.fetch(experts[n]) for n in chosen], list(chosen.values()), folder)
        sha = commit_dir(open_storage(args.out, endpoint=forest.endpoint), folder, "")
    report = {"out": args.out, "weights": chosen, "sha256": sha}
    write_output(report, None, forest.endpoint)
    return report


def _cluster_weights(
    args: argparse.Namespace, forest: Forest, experts: list[ExpertEntry]
) -> dict[str, float]:
    """Each expert's mean cluster weight over the first ``--sample`` documents of
    ``--target-data`` (each document its own context; elmtrain.clusters.routing)."""
    if not args.target_data:
        raise BadInputError("--weights clusters needs --target-data")
    if not args.cluster_temperature > 0 or args.sample < 1:
        raise BadInputError("--weights clusters: --cluster-temperature > 0 and --sample >= 1")
    from itertools import islice

    from elmtrain.clusters.store import load_router
    from elmtrain.data.documents import iter_documents

    router = load_router(forest.storage, experts)
    documents = list(islice(iter_documents(args.target_data, forest.endpoint), args.sample))
    if not documents:
        raise BadInputError(f"{', '.join(args.target_data)}: no documents")
    mean = router.weights(documents, args.cluster_temperature).mean(axis=0)
    return {e.domain: float(w) for e, w in zip(experts, mean, strict=True)}

"""``elmtrain branch``: initialise a new expert from the forest, then train it on its domain."""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from elmcore import layout
from elmcore.btm import InitStrategy
from elmcore.errors import BadInputError
from elmcore.names import branch_run_id, validate_label
from elmcore.records import ClusterLineage, Parent, Record, Result
from elmcore.storage.commit import committed_steps
from elmtrain.cache import cache_dir
from elmtrain.commands.common import (
    add_forest_args,
    add_training_args,
    open_forest,
    training_config,
)
from elmtrain.forest import Forest
from elmtrain.run.outcome import failure_recorded, finish_if_done
from elmtrain.run.spec import JobSpec

_INDEX = re.compile(r"[0-9]{1,6}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class InitRecord(Record):
    """``runs/<id>/init.json``: how the expert was initialised, kept for a resumed attempt."""

    parents: list[Parent]
    prior: dict[str, float]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("branch", help="initialise and train one expert (ELM)")
    add_forest_args(parser)
    parser.add_argument("--domain", required=True, help="the domain's name (DNS-1123 label)")
    parser.add_argument("--version", type=int, default=1, help="expert version (>= 1)")
    parser.add_argument("--data", nargs="+", required=True, help="the domain's training text")
    parser.add_argument("--val-data", nargs="*", default=[], help="the domain's validation text")
    parser.add_argument("--init", choices=[s.value for s in InitStrategy], default="posterior")
    parser.add_argument("--top-k", type=int, default=None, help="posterior init: keep k experts")
    parser.add_argument("--init-sample", type=int, default=64, help="sequences for the posterior")
    parser.add_argument("--copy-from", help="init 'copy': the expert's domain")
    parser.add_argument("--run-id", help="default: branch.<domain>.v<version>")
    parser.add_argument(
        "--cluster",
        metavar="SET:INDEX:SHA256",
        help="the cluster this expert is trained on (c-BTM): recorded in its lineage, checked "
        "against the set's clusterer; routing by cluster weights the expert by it",
    )
    add_training_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Result:
    domain = validate_label(args.domain, "domain")
    run_id = args.run_id or branch_run_id(domain, args.version)
    forest = open_forest(args)
    with failure_recorded(forest, run_id):  # a bad --cluster too: the operator reads why
        cluster = parse_cluster(args.cluster) if args.cluster is not None else None
        return _train(args, forest, domain, run_id, cluster)


def parse_cluster(value: str) -> ClusterLineage:
    """``SET:INDEX:SHA256`` (the set's name, a DNS label; the cluster's index; the clusterer's
    sha256, 64 lowercase hex digits), or the BadInputError that names the flag."""
    parts = value.split(":")
    if len(parts) != 3 or not _INDEX.fullmatch(parts[1]) or not _SHA256.fullmatch(parts[2]):
        raise BadInputError(
            f"--cluster {value[:200]!r}: expected SET:INDEX:SHA256 (a cluster set's name, "
            "a cluster index >= 0, the clusterer's 64-hex-digit sha256)"
        )
    name = validate_label(parts[0], "--cluster set")
    return ClusterLineage(set=name, index=int(parts[1]), clusterer_sha256=parts[2])


def check_cluster(forest: Forest, cluster: ClusterLineage) -> None:
    """The clusterer exists as recorded (its marker's sha256) and has the cluster."""
    from elmtrain.clusters.store import clusterer_size  # numpy, safetensors: not for --help

    size = clusterer_size(forest.storage, cluster.set, cluster.clusterer_sha256)
    if cluster.index >= size:
        raise BadInputError(
            f"--cluster: set {cluster.set!r} has {size} clusters (0..{size - 1}), "
            f"not cluster {cluster.index}"
        )


def _train(
    args: argparse.Namespace,
    forest: Forest,
    domain: str,
    run_id: str,
    cluster: ClusterLineage | None = None,
) -> Result:
    cfg = training_config(args)
    spec = JobSpec(
        kind="expert",
        run_id=run_id,
        out_key=layout.expert(domain, args.version),
        train_data=args.data,
        val_data=args.val_data,
        training=cfg,
        domain=domain,
        version=args.version,
        init_strategy=args.init,
        merge=args.merge,
        cluster=cluster,
    )
    previous = finish_if_done(forest, spec)
    if previous is not None:
        return previous
    manifest = forest.manifest()
    if manifest.seed is None:
        raise BadInputError("the forest has no seed yet: run 'elmtrain seed' first")
    if cluster is not None:
        check_cluster(forest, cluster)
    # torch and transformers from here on: a rerun of a finished branch never imports them.
    from elmtrain.data.order import sample_sequences
    from elmtrain.model.families import check_vocab
    from elmtrain.run import branch_init
    from elmtrain.run.jobs import run_training_job
    from elmtrain.run.parallel import place
    from elmtrain.run.sharded_load import open_model
    from elmtrain.runtime import setup_runtime

    runtime = setup_runtime(cfg)
    tokenizer = forest.tokenizer()
    init_key = f"{layout.run(run_id)}/init.json"
    if committed_steps(forest.storage, layout.run_checkpoints(run_id)) and forest.storage.exists(
        init_key
    ):
        # Resuming: the checkpoint holds the weights; the lineage was recorded at the start.
        recorded = InitRecord.model_validate_json(forest.storage.read_bytes(init_key))
        spec.parents = recorded.parents
        return run_training_job(forest, spec, open_model(forest.seed_dir()), runtime)
    with runtime.main_first():  # the branch's text, prepared once (Runtime.main_first)
        sample = sample_sequences(
            forest.token_store().sequences(args.data, cfg.seq_len), args.init_sample, cfg.seed
        )
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        init = branch_init.initialize(
            forest,
            manifest,
            domain,
            InitStrategy(args.init),
            sample,
            runtime,
            Path(tmp),
            k=args.top_k,
            copy_from=args.copy_from,
        )
        # Placed before the init folder goes: under fsdp each rank reads its own shards of it.
        model = place(open_model(init.model_dir), cfg, runtime)
    check_vocab(model, len(tokenizer), f"branch {domain}")
    spec.parents = init.parents
    record = InitRecord(parents=init.parents, prior=init.prior)
    forest.storage.write_bytes(init_key, record.model_dump_json(indent=1).encode())
    return run_training_job(forest, spec, model, runtime)

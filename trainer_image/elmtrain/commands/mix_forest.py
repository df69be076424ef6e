"""``elmtrain mix-forest``: the operator's mix step (``ElmForest.spec.mix``) in one Job:
``elmtrain mix`` into ``moe/v<n>-<key>/mix``, ``elmtrain mix-train`` of it into
``moe/v<n>-<key>/model``, then the run's ``result.json`` (kind ``mix``) that the operator
verifies and records in the manifest.

One Job rather than two: the untrained mix is never an artifact the operator has to watch, and
a retried pod resumes where the last one stopped (a committed mix is not made again, the
finetuning resumes from its checkpoints, a written result ends the run at once).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from elmcore import layout
from elmcore.errors import BadInputError
from elmcore.names import mix_run_id
from elmcore.records import Lineage, MixRecord, Parent, Result
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import read_marker
from elmtrain.commands import mix, mix_train
from elmtrain.commands.common import add_forest_args, open_forest, write_output
from elmtrain.forest import Forest
from elmtrain.mix.lineage import MixLineage
from elmtrain.run.outcome import failure_recorded, finished_result


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("mix-forest", help="the forest's mix step: mix, finetune, record")
    add_forest_args(parser)
    parser.add_argument("--number", type=int, required=True, help="the forest's mix number")
    parser.add_argument("--key", required=True, help="the operator's key of experts + settings")
    parser.add_argument(
        "--experts", required=True, help="domain=version,... the manifest must still hold"
    )
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--average", choices=("uniform", "posterior"), default="uniform")
    parser.add_argument("--router", choices=("random", "centroids"), default="random")
    parser.add_argument("--router-only", action="store_true")
    parser.add_argument("--data", nargs="*", default=None, help="default: the experts' own")
    parser.add_argument("--val-data", nargs="*", default=None, help="default: the experts' own")
    parser.add_argument("--training", help="TrainingConfig as JSON, or @file.json")
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.set_defaults(func=run)


def expected_experts(text: str) -> dict[str, int]:
    pairs: dict[str, int] = {}
    for item in text.split(","):
        domain, _, version = item.partition("=")
        if not version.isdigit():
            raise BadInputError(f"--experts: {item!r} is not domain=version")
        pairs[domain.strip()] = int(version)
    return pairs


def check_current(forest: Forest, expected: dict[str, int]) -> None:
    """The Job mixes the expert set it was planned for, or nothing: a forest that moved on has
    a newer mix Job (another key), and this one's would never be recorded."""
    merged = {d: e.version for d, e in forest.manifest().experts.items()}
    if merged != expected:
        raise BadInputError(
            f"the manifest's experts are now {merged}, not {expected}: this mix is superseded"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    forest = open_forest(args)
    run_id = mix_run_id(args.number, args.key)
    done = finished_result(forest, run_id)
    if done is not None:
        report = done.model_dump(mode="json")
        write_output(report, None, forest.endpoint)
        return report
    with failure_recorded(forest, run_id):
        expected = expected_experts(args.experts)
        root = args.forest.rstrip("/")
        untrained = layout.mix_untrained(args.number, args.key)
        model = layout.mix_model(args.number, args.key)
        target = open_storage(f"{root}/{untrained}", endpoint=forest.endpoint)
        if os.environ.get("RANK", "0") != "0":
            _wait_committed(target)  # one writer: rank 0 mixes, the others train with it
        elif read_marker(target, "") is None:
            check_current(forest, expected)
            mix.run(_mix_args(args, f"{root}/{untrained}", ",".join(sorted(expected))))
        report = mix_train.run(_train_args(args, f"{root}/{untrained}", f"{root}/{model}", run_id))
    if not report:  # not rank 0
        return report
    result = _result(args, run_id, model, report)
    forest.storage.write_bytes(layout.run_result(run_id), result.model_dump_json(indent=1).encode())
    write_output(result.model_dump(mode="json"), None, forest.endpoint)
    return result.model_dump(mode="json")


def _wait_committed(target: Storage, poll: float = 2.0) -> None:
    """Until rank 0's mix is committed; if rank 0 fails, torchrun stops this rank."""
    while read_marker(target, "") is None:
        time.sleep(poll)


def _mix_args(args: argparse.Namespace, out: str, experts: str) -> argparse.Namespace:
    return argparse.Namespace(
        forest=args.forest, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region, out=out,
        experts=experts, top_k=args.top_k, average=args.average, target_data=[],
        router=args.router, seed=0, sample=64, seq_len=128,
    )  # fmt: skip


def _train_args(
    args: argparse.Namespace, untrained: str, out: str, run_id: str
) -> argparse.Namespace:
    return argparse.Namespace(
        forest=args.forest, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region,
        mix=untrained, out=out, data=args.data, val_data=args.val_data,
        router_only=args.router_only, aux_loss_coef=None, run_id=run_id,
        training=args.training, steps=args.steps, random_seed=None,
    )  # fmt: skip


def _result(args: argparse.Namespace, run_id: str, model: str, report: dict[str, Any]) -> Result:
    """The run's result from the finetuned folder's ``mix.json`` (as mix-train reported it)."""
    lineage = MixLineage.model_validate(
        {k: v for k, v in report.items() if k not in ("out", "sha256")}
    )
    tune = lineage.finetunes[-1]
    return Result(
        run_id=run_id,
        kind="mix",
        path=model,
        sha256=str(report["sha256"]),
        init_strategy=lineage.router,
        parents=[
            Parent(kind="expert", domain=e.domain, version=e.version, weight=e.weight)
            for e in lineage.experts
        ],
        metrics=tune.metrics,
        lineage=Lineage(
            data=tune.data,
            val_data=tune.val_data,
            training=tune.training,
            image=tune.image,
            elmtrain_version=tune.elmtrain_version,
        ),
        mix=MixRecord(
            number=args.number,
            key=args.key,
            top_k=lineage.top_k,
            router=lineage.router,
            average=lineage.average,
            router_only=tune.router_only,
            steps=tune.steps,
            untrained_path=layout.mix_untrained(args.number, args.key),
        ),
    )

"""``elmtrain mix-train``: finetune the Mixtral folder ``elmtrain mix`` wrote (Branch-Train-MiX's
last step), every parameter or only the routers, on the mixed experts' training text.

It runs the training loop branch training runs (``run/jobs.py``'s ``train_and_evaluate``):
the same checkpoints, resume, progress records, sharding strategies and exit codes. The
routers' load-balancing loss is the loss engine's (``model/fused_loss.py``). The command line
is checked, and a finished run found, before torch is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from pydantic import ValidationError

from elmcore import layout
from elmcore.errors import BadInputError, ElmError, NotFoundError
from elmcore.manifest import Manifest
from elmcore.names import branch_run_id, validate_run_id
from elmcore.records import Lineage, Result
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import read_marker
from elmtrain.commands.common import add_forest_args, open_forest, training_config, write_output
from elmtrain.forest import Forest
from elmtrain.mix.lineage import LINEAGE_FILE, MixedExpert, MixLineage
from elmtrain.run.outcome import failure_recorded


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("mix-train", help="finetune a mixed MoE model (BTX), or its routers")
    add_forest_args(parser)
    parser.add_argument("--mix", required=True, help="the folder 'elmtrain mix' wrote")
    parser.add_argument("--out", required=True, help="where to write the finetuned HF folder")
    parser.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="training text (default: the mixed experts' own, from their lineage)",
    )
    parser.add_argument(
        "--val-data",
        nargs="*",
        default=None,
        help="validation text (default: the mixed experts' own, from their lineage)",
    )
    parser.add_argument(
        "--router-only", action="store_true", help="train the routers only; all else frozen"
    )
    parser.add_argument(
        "--aux-loss-coef",
        type=float,
        default=None,
        help="load-balancing loss weight (default: the mix's router_aux_loss_coef, 0.01)",
    )
    parser.add_argument("--run-id", help="default: mix-train.<hash of the mix, --out, mode>")
    parser.add_argument("--training", help="TrainingConfig as JSON, or @file.json")
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.add_argument("--seed", type=int, dest="random_seed", help="override training.seed")
    parser.set_defaults(func=run)


def _read_json(storage: Storage, name: str, where: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(storage.read_bytes(name))
    except NotFoundError:
        raise BadInputError(f"{where}: no {name}") from None
    except ValueError as error:
        raise BadInputError(f"{where}: {name} is not JSON ({error})") from None
    return data


def read_mix(storage: Storage, where: str) -> tuple[dict[str, Any], MixLineage, str]:
    """The mix's config, lineage and commit sha256; bad input unless it is a committed
    Mixtral folder with its ``mix.json``."""
    found = read_marker(storage, "")
    if found is None:
        raise BadInputError(f"{where}: not a committed model folder (no {layout.COMMIT_MARKER})")
    config = _read_json(storage, "config.json", where)
    if config.get("model_type") != "mixtral":
        raise BadInputError(
            f"{where}: config.json model_type is {config.get('model_type')!r}, not 'mixtral': "
            "mix-train finetunes the folder 'elmtrain mix' writes"
        )
    try:
        lineage = MixLineage.model_validate(_read_json(storage, LINEAGE_FILE, where))
    except ValidationError as error:
        raise BadInputError(f"{where}: {LINEAGE_FILE}: {error}") from None
    return config, lineage, found[1]


def _expert_lineage(forest: Forest, manifest: Manifest, expert: MixedExpert) -> Lineage | None:
    """What made the exact expert version mixed: the manifest's entry if it still is that
    version, else its branch run's result."""
    entry = manifest.experts.get(expert.domain)
    if entry is not None and entry.sha256 == expert.sha256:
        return entry.lineage
    try:
        key = layout.run_result(branch_run_id(expert.domain, expert.version))
        result = Result.model_validate_json(forest.storage.read_bytes(key))
    except (NotFoundError, ValidationError):
        return None
    return result.lineage if result.sha256 == expert.sha256 else None


def experts_text(
    forest: Forest, lineage: MixLineage, need_train: bool = True
) -> tuple[list[str], list[str]]:
    """The mixed experts' training and validation locations (their union, in slot order)."""
    manifest = forest.manifest()
    train: list[str] = []
    val: list[str] = []
    for expert in lineage.experts:
        record = _expert_lineage(forest, manifest, expert)
        if record is None:
            record = Lineage()
        if need_train and not record.data:
            raise BadInputError(
                f"expert {expert.domain} v{expert.version} records no training text in its "
                "lineage (lineage.data); name the text with --data"
            )
        train += [s.location for s in record.data if s.location not in train]
        val += [s.location for s in record.val_data if s.location not in val]
    return train, val


def default_run_id(mix_sha256: str, out: str, router_only: bool) -> str:
    key = f"{mix_sha256}\n{out}\n{'router' if router_only else 'all'}"
    return f"mix-train.{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def finished(out: Storage, run_id: str, mix_sha256: str) -> dict[str, Any] | None:
    """The report of an earlier attempt that committed this run's output, if any."""
    found = read_marker(out, "")
    if found is None:
        return None
    try:
        lineage = MixLineage.model_validate_json(out.read_bytes(LINEAGE_FILE))
    except (ElmError, ValidationError):
        return None
    if not lineage.finetunes:
        return None
    last = lineage.finetunes[-1]
    if last.run_id != run_id or last.mix_sha256 != mix_sha256:
        return None
    return {"sha256": found[1], **lineage.model_dump(mode="json")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    forest = open_forest(args)
    mix_storage = open_storage(args.mix, endpoint=forest.endpoint)
    config, lineage, mix_sha = read_mix(mix_storage, f"--mix {args.mix}")
    run_id = validate_run_id(args.run_id or default_run_id(mix_sha, args.out, args.router_only))
    out = open_storage(args.out, endpoint=forest.endpoint)
    previous = finished(out, run_id, mix_sha)
    if previous is not None:
        report = {"out": args.out, **previous}
        write_output(report, None, forest.endpoint)
        return report
    with failure_recorded(forest, run_id):
        cfg = training_config(args)
        if args.aux_loss_coef is not None and args.aux_loss_coef < 0:
            raise BadInputError(f"--aux-loss-coef {args.aux_loss_coef}: must be >= 0")
        coef = (
            args.aux_loss_coef
            if args.aux_loss_coef is not None
            else float(config.get("router_aux_loss_coef", 0.0) or 0.0)
        )
        train: list[str] = []
        val: list[str] = []
        if args.data is None or args.val_data is None:
            train, val = experts_text(forest, lineage, need_train=args.data is None)
        data = args.data if args.data is not None else train
        val_data = args.val_data if args.val_data is not None else val
        if not data:
            raise BadInputError("--data: no training text given")
        # torch and transformers from here on.
        from elmtrain.run.mix_train import MixTrainJob, finetune

        job = MixTrainJob(
            run_id=run_id,
            mix=args.mix,
            mix_sha256=mix_sha,
            lineage=lineage,
            out=args.out,
            train_data=data,
            val_data=val_data,
            training=cfg,
            router_only=args.router_only,
            aux_loss_coef=coef,
        )
        report = finetune(forest, mix_storage, job)
    if report:  # rank 0's
        write_output(report, None, forest.endpoint)
    return report

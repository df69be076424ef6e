"""A stand-in for ``elmtrain`` in the operator's reliability tests: it commits a real artifact
(made once by the real trainer) for the Job's run, through elmcore's own commit protocol.

The reliability sweeps exercise the operator hundreds of times; real training would make each
run minutes long and teach nothing more about the operator (the trainer has its own crash and
resume tests). This program keeps everything the operator observes real: progress records,
a committed folder whose marker lists every file's sha256, then the run's result record. It
accepts ``elmtrain``'s command lines as the operator builds them.

Environment: ``STANDIN_TEMPLATES`` (a forest folder holding ``tokenizer/`` and ``seed/``),
``STANDIN_S3_ENDPOINT`` (S3 behind any test proxy, so the proxy sees the operator only),
``STANDIN_SECONDS`` (how long "training" lasts), ``STANDIN_GATE`` (a file a branch run waits
for before committing: lets a test have many runs finish at once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from elmcore import layout
from elmcore.errors import ElmError, ExitCode, NotFoundError
from elmcore.names import SEED_RUN_ID, branch_run_id
from elmcore.records import Metrics, Parent, Progress, Result
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import commit_dir, verify_committed

TOKENIZER_RUN_ID = "tokenizer"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="standin")
    parser.add_argument("command", choices=("tokenizer", "prepare", "seed", "branch"))
    parser.add_argument("--forest", required=True)
    parser.add_argument("--s3-endpoint")
    parser.add_argument("--s3-region")
    parser.add_argument("--domain")
    parser.add_argument("--version", type=int)
    parser.add_argument("--training", default="{}")
    parser.add_argument("--run-id")
    args, _ = parser.parse_known_args(argv)  # data, init, model, ...: not needed to commit
    return args


def _target(args: argparse.Namespace) -> tuple[str, str, str]:
    """(run id, artifact key, template folder) of the Job."""
    if args.command == "tokenizer":
        return TOKENIZER_RUN_ID, layout.TOKENIZER, "tokenizer"
    if args.command == "seed":
        return SEED_RUN_ID, layout.SEED, "seed"
    run_id = branch_run_id(args.domain, args.version)
    return run_id, layout.expert(args.domain, args.version), "seed"  # an expert is a model too


def _finished(storage: Storage, run_id: str) -> bool:
    """Like the trainer: a rerun of a finished run verifies its result and stops."""
    try:
        result = Result.model_validate_json(storage.read_bytes(layout.run_result(run_id)))
        verify_committed(storage, result.path, result.sha256)
    except (NotFoundError, ElmError):
        return False
    return True


def _prepare(storage: Storage, run_id: str) -> int:
    """A prepare Job: progress, then success. It records no shards, so the operator's next
    look plans the training Job from the succeeded prepare Job, as after a real one."""
    done = Progress(run_id=run_id, phase="done", step=1, total_steps=1)
    time.sleep(float(os.environ.get("STANDIN_SECONDS", "0.5")) / 5)
    storage.write_bytes(layout.run_progress(run_id), done.model_dump_json().encode())
    return 0


def run(argv: list[str]) -> int:
    args = _parse(argv)
    endpoint = os.environ.get("STANDIN_S3_ENDPOINT") or args.s3_endpoint
    storage = open_storage(args.forest, endpoint=endpoint, region=args.s3_region)
    if args.command == "prepare":
        return _prepare(storage, args.run_id)
    run_id, key, template = _target(args)
    if _finished(storage, run_id):
        return 0
    steps = int(json.loads(args.training).get("steps", 1))
    seconds = float(os.environ.get("STANDIN_SECONDS", "0.5"))
    for step in range(0, steps + 1, max(1, steps // 4)):
        progress = Progress(run_id=run_id, phase="training", step=step, total_steps=steps)
        storage.write_bytes(layout.run_progress(run_id), progress.model_dump_json().encode())
        time.sleep(seconds / 5)
    gate = os.environ.get("STANDIN_GATE") if args.command == "branch" else None
    while gate and not Path(gate).exists():
        time.sleep(0.05)
    folder = Path(os.environ["STANDIN_TEMPLATES"]) / template
    sha = commit_dir(storage, folder, key)
    kind = {"tokenizer": "tokenizer", "seed": "seed", "branch": "expert"}[args.command]
    metrics = Metrics()
    if kind != "tokenizer":
        metrics = Metrics.model_validate_json((folder / layout.METRICS).read_text())
        metrics = metrics.model_copy(update={"steps": steps})
    result = Result(
        run_id=run_id,
        kind=kind,
        path=key,
        sha256=sha,
        domain=args.domain,
        version=args.version,
        init_strategy="seed" if kind == "expert" else None,
        parents=[Parent(kind="seed", weight=1.0)] if kind == "expert" else [],
        metrics=metrics,
    )
    storage.write_bytes(layout.run_result(run_id), result.model_dump_json().encode())
    done = Progress(run_id=run_id, phase="done", step=steps, total_steps=steps)
    storage.write_bytes(layout.run_progress(run_id), done.model_dump_json().encode())
    return 0


def main() -> None:
    # SIGTERM (eviction, deletion) ends it the way it ends the trainer: transient, retry.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(ExitCode.TRANSIENT)))
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()

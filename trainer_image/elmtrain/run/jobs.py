"""The life of a training job (seed or branch): train, evaluate, commit, report, merge.

A job is idempotent by run id: re-running a finished one verifies its result and exits
(``run.outcome``, before this module is imported); a killed one resumes from its last committed
checkpoint.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import PreTrainedModel

from elmcore import layout
from elmcore.errors import NotFoundError
from elmcore.records import CurvePoint, Metrics, Progress, Result
from elmcore.storage.commit import commit_dir
from elmcore.storage.manifest_store import merge_verified
from elmtrain.cache import cache_dir
from elmtrain.config import TrainingConfig
from elmtrain.data import TokenSequences, TokenStore, load_sequences
from elmtrain.forest import Forest
from elmtrain.model.families import save_model
from elmtrain.model.files import copy_tokenizer
from elmtrain.run.checkpoint import Checkpointer
from elmtrain.run.export import export_model
from elmtrain.run.lineage import run_lineage
from elmtrain.run.parallel import place
from elmtrain.run.progress import ProgressReporter
from elmtrain.run.spec import JobSpec
from elmtrain.run.train import train
from elmtrain.runtime import Runtime
from elmtrain.scoring.logprobs import perplexity, token_logprobs

log = structlog.get_logger(__name__)


def _validation_ppl(
    model: PreTrainedModel, val: torch.Tensor | None, runtime: Runtime
) -> tuple[float | None, float | None, int]:
    if val is None:
        return None, None, 0
    loss, ppl, tokens = perplexity(token_logprobs(model, val, runtime))
    return loss, ppl, tokens


def _before_training(
    forest: Forest,
    run_id: str,
    model: PreTrainedModel,
    val: torch.Tensor | None,
    runtime: Runtime,
) -> tuple[float | None, float | None]:
    """Validation loss of the initial weights, measured once per run: a resumed attempt starts
    from a checkpoint, not from the init, so it reads what the first attempt recorded."""
    key = f"{layout.run(run_id)}/before.json"
    try:
        recorded = json.loads(forest.storage.read_bytes(key))
        return recorded["loss"], recorded["perplexity"]
    except NotFoundError:
        pass
    loss, ppl, _ = _validation_ppl(model, val, runtime)
    if runtime.is_main:
        forest.storage.write_bytes(key, json.dumps({"loss": loss, "perplexity": ppl}).encode())
    return loss, ppl


def _learning_curve(
    cfg: TrainingConfig,
    loss_before: float | None,
    during: list[CurvePoint],
    loss_after: float | None,
) -> list[CurvePoint]:
    """Before, every ``eval_interval`` steps, after: kept only when the interval is set."""
    if cfg.eval_interval is None or loss_before is None or loss_after is None:
        return []
    ends = [(0, loss_before), (cfg.steps, loss_after)]
    first, last = (CurvePoint(step=s, loss=v, perplexity=math.exp(v)) for s, v in ends)
    return [first, *during, last] if cfg.steps > 0 else [first]


@dataclass
class Trained:
    """A finished run's model (whole on every rank under ddp; under fsdp each rank's shards,
    exported by ``run/export.py``), its metrics, checkpointer and token store."""

    model: PreTrainedModel
    metrics: Metrics
    checkpointer: Checkpointer
    store: TokenStore


def train_and_evaluate(
    forest: Forest,
    run_id: str,
    cfg: TrainingConfig,
    train_data: list[str],
    val_data: list[str],
    model: PreTrainedModel,
    runtime: Runtime,
) -> Trained:
    """Read the data, measure the init, run the training loop (resuming from the run's last
    checkpoint), measure the result: every job that trains (seed, branch, ``mix-train``)."""
    reporter = ProgressReporter(
        forest.storage if runtime.is_main else None, run_id, cfg.progress_interval_seconds
    )
    reporter.report(Progress(run_id=run_id, phase="initializing"), force=True)
    store = forest.token_store()
    # Training reads its windows lazily from the token shards (prepared here, rank 0 first,
    # if the prepare step has not); validation is a few batches, read into memory.
    with runtime.main_first():
        sequences: TokenSequences | torch.Tensor = (
            store.sequences(train_data, cfg.seq_len)
            if train_data
            else torch.empty(0, cfg.seq_len, dtype=torch.long)  # importing weights: no training
        )
        val = None
        if val_data:
            val = load_sequences(val_data, store, cfg.seq_len, cfg.eval_batches * cfg.batch_size)
    log.info(
        "job.data",
        run_id=run_id,
        train_sequences=len(sequences),
        val_sequences=0 if val is None else len(val),
    )

    # On its ranks now (run/parallel.py): whole, or each rank's shards under fsdp (a lazily
    # built model reads only those from its folder), so the init is measured as it trains.
    model = place(model, cfg, runtime)
    checkpointer = Checkpointer(forest.storage, run_id, cfg.keep_checkpoints)
    loss_before, ppl_before = _before_training(forest, run_id, model, val, runtime)
    outcome = train(model, sequences, cfg, runtime, checkpointer, reporter, val)
    reporter.report(
        Progress(run_id=run_id, phase="evaluating", step=cfg.steps, total_steps=cfg.steps),
        force=True,
    )
    loss_after, ppl_after, val_tokens = _validation_ppl(outcome.model, val, runtime)
    metrics = Metrics(
        val_loss_before=loss_before,
        val_ppl_before=ppl_before,
        val_loss_after=loss_after,
        val_ppl_after=ppl_after,
        val_tokens=val_tokens,
        train_tokens=outcome.tokens,
        steps=outcome.steps,
        seconds=round(outcome.seconds, 2),
        curve=_learning_curve(cfg, loss_before, outcome.curve, loss_after),
    )
    return Trained(outcome.model, metrics, checkpointer, store)


def run_training_job(
    forest: Forest, spec: JobSpec, model: PreTrainedModel, runtime: Runtime
) -> Result:
    trained = train_and_evaluate(
        forest, spec.run_id, spec.training, spec.train_data, spec.val_data, model, runtime
    )
    result = Result(
        run_id=spec.run_id,
        kind=spec.kind,
        path=spec.out_key,
        sha256="0" * 64,
        domain=spec.domain,
        version=spec.version,
        init_strategy=spec.init_strategy,
        parents=spec.parents,
        metrics=trained.metrics,
        lineage=run_lineage(forest, trained.store, spec) if runtime.is_main else None,
    )
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        # Every rank: under fsdp the weights are gathered one tensor at a time, rank 0 writes.
        export_model(trained.model, Path(tmp), runtime)
        if runtime.is_main:
            result = publish(forest, spec, Path(tmp), result)
            checkpointer_cleanup(trained.checkpointer)
    runtime.barrier()
    return result


def publish(forest: Forest, spec: JobSpec, model: PreTrainedModel | Path, result: Result) -> Result:
    """Commit the final model (or a folder it was exported into, ``run/export.py``), then the
    result record, then (optionally) merge it."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = model if isinstance(model, Path) else Path(tmp)
        if not isinstance(model, Path):
            save_model(model.to("cpu"), folder)
        # The forest's tokenizer beside the weights: the folder loads anywhere as it is.
        copy_tokenizer(forest.tokenizer_dir(), folder)
        (folder / layout.METRICS).write_text(result.metrics.model_dump_json(indent=1))
        sha = commit_dir(forest.storage, folder, spec.out_key)
    result = result.model_copy(update={"sha256": sha})
    forest.storage.write_bytes(
        layout.run_result(spec.run_id), result.model_dump_json(indent=1).encode()
    )
    ProgressReporter(forest.storage, spec.run_id).report(
        Progress(
            run_id=spec.run_id,
            phase="done",
            step=result.metrics.steps,
            total_steps=result.metrics.steps,
        ),
        force=True,
    )
    log.info(
        "job.committed",
        run_id=spec.run_id,
        path=spec.out_key,
        sha256=sha[:12],
        metrics=json.loads(result.metrics.model_dump_json()),
    )
    if spec.merge:
        manifest = merge_verified(forest.storage, result)
        log.info("job.merged", run_id=spec.run_id, revision=manifest.revision)
    return result


def checkpointer_cleanup(checkpointer: Checkpointer) -> None:
    """Step checkpoints are only for resuming; the committed result replaces them."""
    checkpointer.storage.delete_prefix(checkpointer.prefix)

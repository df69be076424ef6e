"""``mix-train``'s work: load the mix, choose what trains, run branch training's loop
(``run/jobs.py``), publish the finetuned folder with its lineage extended.

The loss engine adds the routers' load-balancing loss once the model's config asks for it
(``output_router_logits``); here it is switched on for training and back off in the
published config (serving does not need the router logits). ``--router-only`` freezes every
parameter but the routers' (``gate``) weights: the optimizer takes only trainable ones, and a
resumed run keeps the same ones frozen (``run/train.py``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from torch import nn
from transformers import PreTrainedModel

from elmcore import layout
from elmcore.errors import BadInputError
from elmcore.records import Progress
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import commit_dir, fetch_committed
from elmtrain.cache import cache_dir
from elmtrain.config import TrainingConfig
from elmtrain.forest import Forest
from elmtrain.mix.lineage import LINEAGE_FILE, MixFinetune, MixLineage
from elmtrain.model.families import check_vocab, load_model
from elmtrain.model.files import copy_tokenizer
from elmtrain.run.export import export_model
from elmtrain.run.jobs import Trained, checkpointer_cleanup, train_and_evaluate
from elmtrain.run.lineage import IMAGE_ENV, elmtrain_version
from elmtrain.run.progress import ProgressReporter
from elmtrain.runtime import setup_runtime

log = structlog.get_logger(__name__)


@dataclass
class MixTrainJob:
    run_id: str
    mix: str  # the mix's location
    mix_sha256: str
    lineage: MixLineage  # the mix's own record, extended by this run's
    out: str
    train_data: list[str]
    val_data: list[str]
    training: TrainingConfig
    router_only: bool
    aux_loss_coef: float


def is_router(module: nn.Module) -> bool:
    """A mixture-of-experts block's router: the ``gate`` of Mixtral's sparse MoE block
    (``MixtralTopKRouter`` in transformers 5, a ``Linear`` named ``gate`` before)."""
    return "router" in type(module).__name__.lower()


def router_parameters(model: PreTrainedModel) -> set[str]:
    """The names of the routers' parameters: ``model.layers.<l>.mlp.gate.weight``."""
    names = set()
    for prefix, module in model.named_modules():
        if is_router(module) or prefix.endswith(("block_sparse_moe.gate", "mlp.gate")):
            names |= {f"{prefix}.{name}" for name, _ in module.named_parameters()}
    return names


def freeze_all_but_routers(model: PreTrainedModel) -> int:
    """Freeze every parameter except the routers'; how many parameters still train."""
    routers = router_parameters(model)
    if not routers:
        raise BadInputError("--router-only: the model has no router (gate) parameters")
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in routers)
        trainable += parameter.numel() if name in routers else 0
    return trainable


def finetune(forest: Forest, mix_storage: Storage, job: MixTrainJob) -> dict[str, Any]:
    cfg = job.training
    runtime = setup_runtime(cfg)
    tokenizer = forest.tokenizer()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp) / "mix"
        fetch_committed(mix_storage, "", folder, job.mix_sha256)
        model = load_model(folder)
    if type(model).__name__ != "MixtralForCausalLM":
        raise BadInputError(f"--mix {job.mix}: loads as {type(model).__name__}, not Mixtral")
    check_vocab(model, len(tokenizer), f"--mix {job.mix}")
    published_logits = bool(model.config.output_router_logits)
    model.config.output_router_logits = True  # the load-balancing loss (fused_loss.py)
    model.config.router_aux_loss_coef = job.aux_loss_coef
    model.train()
    if job.router_only:
        trainable = freeze_all_but_routers(model)
    else:
        trainable = sum(p.numel() for p in model.parameters())
    log.info(
        "mix_train.model",
        run_id=job.run_id,
        experts=int(model.config.num_local_experts),
        top_k=int(model.config.num_experts_per_tok),
        router_only=job.router_only,
        trainable=trainable,
        aux_loss_coef=job.aux_loss_coef,
    )
    trained = train_and_evaluate(
        forest, job.run_id, cfg, job.train_data, job.val_data, model, runtime
    )
    trained.model.config.output_router_logits = published_logits
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp)
        # Every rank: whole models are saved by rank 0, fsdp shards streamed one tensor at a
        # time (run/export.py), never gathered whole.
        export_model(trained.model, folder, runtime)
        if runtime.is_main:
            lineage = extended_lineage(job, trained)
            sha = publish(forest, folder, lineage, job)
            checkpointer_cleanup(trained.checkpointer)
            report = {"out": job.out, "sha256": sha, **lineage.model_dump(mode="json")}
    runtime.barrier()
    return report


def extended_lineage(job: MixTrainJob, trained: Trained) -> MixLineage:
    """The mix's ``mix.json`` with this finetuning appended."""
    record = MixFinetune(
        run_id=job.run_id,
        mix=job.mix,
        mix_sha256=job.mix_sha256,
        steps=job.training.steps,
        router_only=job.router_only,
        aux_loss_coef=job.aux_loss_coef,
        data=trained.store.sources(job.train_data),
        val_data=trained.store.sources(job.val_data) if job.val_data else [],
        training=job.training.model_dump(mode="json"),
        metrics=trained.metrics,
        image=os.environ.get(IMAGE_ENV) or None,
        elmtrain_version=elmtrain_version(),
    )
    return job.lineage.model_copy(update={"finetunes": [*job.lineage.finetunes, record]})


def publish(forest: Forest, folder: Path, lineage: MixLineage, job: MixTrainJob) -> str:
    """Commit the finetuned folder (its weights and config saved in ``folder``; the forest's
    tokenizer, the metrics and the extended ``mix.json`` added) at ``--out``; its commit
    marker's sha256."""
    copy_tokenizer(forest.tokenizer_dir(), folder)
    metrics = lineage.finetunes[-1].metrics
    (folder / layout.METRICS).write_text(metrics.model_dump_json(indent=1))
    (folder / LINEAGE_FILE).write_text(lineage.model_dump_json(indent=1) + "\n")
    sha = commit_dir(open_storage(job.out, endpoint=forest.endpoint), folder, "")
    ProgressReporter(forest.storage, job.run_id).report(
        Progress(run_id=job.run_id, phase="done", step=metrics.steps, total_steps=metrics.steps),
        force=True,
    )
    log.info("mix_train.committed", run_id=job.run_id, out=job.out, sha256=sha[:12])
    return sha

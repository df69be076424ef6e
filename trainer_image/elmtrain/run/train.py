"""The training loop: read top to bottom, like nanoGPT's, plus resume and several ranks.

The data of step s is a pure function of (s, seed) (``data.batch_indices``); each rank takes
its slice of that global batch, and gradient accumulation splits the slice into micro-batches.
So one process, several ranks, or a run resumed from a checkpoint all see identical batches.
How the ranks hold the model (ddp or fsdp) is decided in ``run/parallel.py``, not here.
"""

from __future__ import annotations

import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any

import structlog
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import PreTrainedModel

from elmcore.errors import BadInputError, TransientError
from elmcore.records import CurvePoint, Progress
from elmtrain.config import TrainingConfig
from elmtrain.data import TokenSequences, batch_indices
from elmtrain.run.checkpoint import Checkpointer
from elmtrain.run.parallel import parallelize
from elmtrain.run.progress import ProgressReporter
from elmtrain.runtime import Runtime
from elmtrain.scoring.logprobs import perplexity, token_logprobs

log = structlog.get_logger(__name__)


@dataclass
class TrainOutcome:
    model: PreTrainedModel
    steps: int
    tokens: int
    seconds: float
    final_loss: float | None
    curve: list[CurvePoint]  # validation every ``eval_interval`` steps (none without it)


class _Preemption:
    """SIGTERM (node drain, preemption) asks the loop to checkpoint and exit as transient."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __exit__(self, *_: object) -> None:
        # Once asked, stay deaf: a second SIGTERM (torchrun passing the pod's on, a rank's
        # own) must not kill the process while it exits 75 with its checkpoint committed.
        if not self.requested:
            signal.signal(signal.SIGTERM, self._previous)


class _StopVote:
    """Whether any rank was asked to stop, agreed on without stalling a step.

    Each step starts an all-reduce of this rank's flag before its forward pass and reads the
    result after the optimizer step, by which time it has long arrived: every rank starts and
    reads the same votes at the same steps, so all stop at one step. The flag is a CPU tensor
    reduced over gloo (the default group on CPU, a gloo group beside NCCL on GPUs), so the
    vote never waits for the GPU's queue; a blocking all-reduce every step did.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.distributed = runtime.distributed
        self.group: Any = None
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every rank creates it, here
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.work: Any = None

    def start(self, requested: bool) -> None:
        self.flag.fill_(int(requested))
        if self.distributed:
            self.work = dist.all_reduce(
                self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True
            )

    def result(self) -> bool:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return bool(self.flag.item())


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio`` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def _optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    # Decay matrices only; biases and norm gains are not regularised.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) updates all parameters in one pass per step: the step
    # costs less than the per-tensor loop, as transformers' Trainer defaults to since torch 2.8.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None
    )


def _micro_batches(indices: list[int], runtime: Runtime, cfg: TrainingConfig) -> list[list[int]]:
    if len(indices) % runtime.world_size:
        raise BadInputError(
            f"batch_size {cfg.batch_size} is not divisible by {runtime.world_size} ranks"
        )
    mine = indices[runtime.rank :: runtime.world_size]
    micro = cfg.micro_batch_size or len(mine)
    if len(mine) % micro:
        raise BadInputError(f"per-rank batch {len(mine)} is not divisible by micro batch {micro}")
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def _validate(model: PreTrainedModel, val: torch.Tensor, step: int, runtime: Runtime) -> CurvePoint:
    loss, ppl, _ = perplexity(token_logprobs(model, val, runtime))
    model.train()  # token_logprobs switched it to eval
    log.info("train.validation", step=step, loss=round(loss, 4), perplexity=round(ppl, 2))
    return CurvePoint(step=step, loss=loss, perplexity=ppl)


def train(
    model: PreTrainedModel,
    sequences: torch.Tensor | TokenSequences,
    cfg: TrainingConfig,
    runtime: Runtime,
    checkpointer: Checkpointer,
    reporter: ProgressReporter,
    val: torch.Tensor | None = None,
) -> TrainOutcome:
    # 1. Resume from the last committed checkpoint, if this run has one.
    start_step = 0
    curve: list[CurvePoint] = []
    # Where the data stands is the step (the order is a pure function of step and seed) over
    # these sequences; a checkpoint says which, so a resume never continues on other data.
    data = {"sequences": len(sequences), "seq_len": int(sequences.shape[1])}
    # A whole-model checkpoint replaces the model now; a sharded one loads into its shards
    # once they exist (below).
    resumed = checkpointer.latest(runtime.device)
    if resumed is not None and resumed.model is not None:
        # The checkpoint's weights, the caller's choice of what trains: a part it froze
        # (``mix-train --router-only``) stays frozen, and the optimizer state matches it.
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        model = resumed.model
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)

    # 2. The ranks' share of the model (ddp or fsdp, run/parallel.py; done already if the job
    # placed it): an engine computing the loss with the output layer fused (fused_loss.py);
    # optionally compiled. The optimizer holds this rank's parameters: whole ones, or shards.
    parallel = parallelize(model, cfg, runtime)
    parallel.model.train()
    optimizer = _optimizer(parallel.model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if resumed is not None:
        start_step = resumed.step
        if resumed.state is None:
            start_step, state = checkpointer.load_shards(start_step, parallel.model, optimizer)
        else:
            state = resumed.state
            parallel.load_optimizer_state(optimizer, state["optimizer"])
        curve = [CurvePoint.model_validate(p) for p in state.get("curve", [])]
        recorded = state.get("data", data)  # checkpoints before shards: not recorded
        if recorded != data:
            raise BadInputError(
                f"the training data changed since the checkpoint of step {start_step} "
                f"({recorded['sequences']} sequences then, {data['sequences']} now): restore it, "
                f"or delete runs/{checkpointer.run_id}/checkpoints to start over"
            )
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    engine = parallel.engine
    if cfg.compile:
        engine = torch.compile(engine)  # type: ignore[assignment]

    def save(step: int) -> None:
        state = {
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": step,
            "curve": [p.model_dump() for p in curve],
            "data": data,
        }
        if parallel.sharded_checkpoints:  # every rank writes its shards, in parallel
            checkpointer.save_shards(step, parallel.model, optimizer, state)
            return
        # The whole model and optimizer state, gathered by every rank and written by rank 0.
        weights = parallel.full_model()
        state["optimizer"] = parallel.optimizer_state(optimizer)
        if runtime.is_main:
            assert weights is not None
            checkpointer.save(step, weights, state)
        runtime.barrier()

    # 3. The loop. Nothing in a step waits for the device: the loss stays on it until a
    # progress record is due, and the ranks' vote on stopping arrives during the step.
    tokens_per_step = cfg.batch_size * sequences.shape[1]
    loss_value: float | None = None
    started = time.monotonic()
    window_start, window_steps = started, 0
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not runtime.is_main,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    pin = runtime.device.type == "cuda"

    def read_step(step: int) -> list[torch.Tensor]:
        """This rank's micro-batches of ``step``, read from the sequences (shards: by range),
        in pinned memory on a GPU so that copying them there does not wait."""
        indices = batch_indices(step, cfg.batch_size, len(sequences), cfg.seed)
        batches = [sequences[micro] for micro in _micro_batches(indices, runtime, cfg)]
        return [rows.pin_memory() for rows in batches] if pin else batches

    # The next step's data is read while this one computes.
    reader = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
    upcoming = reader.submit(read_step, start_step) if start_step < cfg.steps else None
    stop_vote = _StopVote(runtime)
    with _Preemption() as preemption, reader, reporter.in_background():
        for step in range(start_step, cfg.steps):
            assert upcoming is not None
            micro_batches = upcoming.result()
            if step + 1 < cfg.steps:
                upcoming = reader.submit(read_step, step + 1)
            # Ranks agree on stopping: SIGTERM may reach one rank only, or each at another
            # step, and a rank saving alone would leave the others at the next all-reduce.
            stop_vote.start(preemption.requested)
            step_loss = torch.zeros((), device=runtime.device)
            for i, rows in enumerate(micro_batches):
                batch = rows.to(runtime.device, non_blocking=True)
                last = i == len(micro_batches) - 1
                with parallel.accumulating(last), runtime.autocast():
                    loss = engine(batch) / len(micro_batches)
                loss.backward()
                step_loss += loss.detach()  # the step's loss: the mean over its micro-batches
            if cfg.grad_clip > 0:
                # Sharded gradients (DTensors) too: torch reduces the norm across ranks.
                torch.nn.utils.clip_grad_norm_(parallel.model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window_steps += 1
            bar.update(1)

            # Progress for the operator, when a record is due: only then is the loss read
            # from the device; throughput over the recent window.
            force = done == cfg.steps or done % cfg.checkpoint_interval == 0
            if reporter.due(force) or done == cfg.steps:
                loss_value = float(step_loss)
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                elapsed = time.monotonic() - window_start
                rate = window_steps * tokens_per_step / elapsed if elapsed > 0 else 0.0
                remaining = (cfg.steps - done) * (elapsed / window_steps)
                reporter.report(
                    Progress(
                        run_id=checkpointer.run_id,
                        phase="training",
                        step=done,
                        total_steps=cfg.steps,
                        tokens_per_second=round(rate, 1),
                        loss=round(loss_value, 5),
                        eta_seconds=remaining,
                    ),
                    force=force,
                )
                if elapsed > 30:
                    window_start, window_steps = time.monotonic(), 0
            # Every rank validates (a small set), so none waits at the next all-reduce; the
            # last point is the job's own evaluation after training.
            curve_point = cfg.eval_interval and done % cfg.eval_interval == 0 and done < cfg.steps
            if val is not None and curve_point:
                curve.append(_validate(parallel.model, val, done, runtime))
            preempted = stop_vote.result() and done < cfg.steps
            if preempted or (done % cfg.checkpoint_interval == 0 and done < cfg.steps):
                save(done)  # once, also when preempted at a checkpoint step
            if preempted:
                bar.close()
                raise TransientError(f"preempted (SIGTERM) at step {done}; checkpoint committed")
    bar.close()
    seconds = time.monotonic() - started
    log.info("train.done", steps=cfg.steps, seconds=round(seconds, 1), loss=loss_value)
    return TrainOutcome(
        model=parallel.unwrap(),  # to evaluate and publish (under fsdp: still sharded)
        steps=cfg.steps,
        tokens=(cfg.steps - start_step) * tokens_per_step,
        seconds=seconds,
        final_loss=loss_value,
        curve=curve,
    )

"""How the ranks hold the model: the one place a sharding strategy is applied.

As torchtitan's ``parallelize``: the training loop gets an ``engine`` to call (input ids in,
loss out) and a few collective operations (gradient sync, full weights, optimizer state) that
mean the same under every strategy, so the loop never asks which one it runs.

- ddp: each rank holds the whole model; DistributedDataParallel all-reduces the gradients (one
  process: the plain model).
- fsdp: FSDP2 (``fully_shard``) on each transformer block, then on the loss module as the root,
  so the embeddings, the final norm and the (tied) output layer form the root's group: FSDP
  gathers them around the loss computation, which reads the output weight directly. A model
  built on the meta device from a folder (``sharded_load.lazy_model``) is sharded first and
  each rank then reads only its own shards; after training it stays sharded and is exported
  tensor by tensor (``run/export.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from elmcore.sharding import Strategy, choose_strategy, training_state_bytes
from elmtrain.config import TrainingConfig
from elmtrain.model.families import load_model
from elmtrain.model.fused_loss import CausalLMLoss
from elmtrain.model.kernels import fuse_activations
from elmtrain.run.sharded_load import fill_shards, pending
from elmtrain.runtime import Runtime

log = structlog.get_logger(__name__)


@dataclass
class Parallel:
    strategy: Strategy
    model: PreTrainedModel  # its parameters: whole tensors, or DTensor shards under fsdp
    engine: nn.Module  # engine(input_ids) -> the mean next-token loss of this rank's rows
    device: torch.device  # where the model computes (its shards may live in host memory)

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are written as each rank's shards (``sharded_checkpoint.py``)
        rather than as the whole model from rank 0."""
        return self.strategy == "fsdp"

    def accumulating(self, last: bool) -> AbstractContextManager[object]:
        """Gradients are reduced across ranks on a step's last micro-batch only."""
        if isinstance(self.engine, FSDPModule):
            self.engine.set_requires_gradient_sync(last)
        elif isinstance(self.engine, DistributedDataParallel) and not last:
            return self.engine.no_sync()
        return nullcontext()

    def full_model(self) -> PreTrainedModel | None:
        """The whole model on rank 0 (None elsewhere), to save; every rank must call it."""
        if self.strategy == "ddp":
            return self.model
        return _plain_copy(self.model, None)

    def unwrap(self) -> PreTrainedModel:
        """The trained model, for evaluation and export: whole under ddp; under fsdp the
        sharded model itself (calling it gathers one block at a time, so every rank must call
        it together), exported tensor by tensor by ``run/export.py``, never copied whole."""
        self.model.activation_checkpointing_disable()
        return self.model

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The whole optimizer state keyed by parameter name (so that a checkpoint resumes
        under another strategy or world size); complete on rank 0. Every rank must call it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.strategy == "fsdp")
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        state = _by_name(self.model, optimizer, state)
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, optimizer, state, options=options)


def place(model: PreTrainedModel, cfg: TrainingConfig, runtime: Runtime) -> PreTrainedModel:
    """``model`` on its ranks before training (``parallelize``, done once): whole on the device
    under ddp, this rank's shards under fsdp; a ``lazy_model``'s weights read in now. Returns
    the model to use (under ddp a lazily built one is replaced by the folder's whole model)."""
    return parallelize(model, cfg, runtime).model


def placed(model: PreTrainedModel) -> Parallel | None:
    """The ``Parallel`` that ``model`` was placed by, if any."""
    found: Parallel | None = getattr(model, _PLACED, None)
    return found


_PLACED = "_elmtrain_parallel"


def parallelize(model: PreTrainedModel, cfg: TrainingConfig, runtime: Runtime) -> Parallel:
    """Apply ``cfg.strategy`` (resolved by ``choose_strategy``) to ``model``, in place: the
    same ``Parallel`` again for a model placed already. A model built by ``lazy_model`` (its
    parameters on the meta device) gets its weights here: each rank reads only its own
    shards under fsdp; under ddp the folder is loaded whole (every rank holds it anyway)."""
    already = placed(model)
    if already is not None:
        return already
    parameters = sum(p.numel() for p in model.parameters())
    strategy = choose_strategy(
        cfg.strategy, parameters, runtime.world_size, device_memory(runtime), cfg.offload_optimizer
    )
    log.info(
        "train.strategy",
        strategy=strategy,
        requested=cfg.strategy,
        parameters=parameters,
        world_size=runtime.world_size,
        state_gib_per_rank=round(
            training_state_bytes(parameters, strategy, runtime.world_size) / 2**30, 3
        ),
        activation_checkpointing=cfg.activation_checkpointing,
        offload_optimizer=cfg.offload_optimizer,
    )
    source = pending(model)
    if source is not None and strategy == "ddp":
        model = load_model(source)  # every rank holds the whole model under ddp anyway
        source = None
    if source is None:
        model.to(runtime.device)
    fuse_activations(model)  # same math, one kernel (model/kernels.py)
    if cfg.activation_checkpointing:
        # transformers' per-block checkpointing keeps the parameters' names (a wrapper module
        # would rename them in checkpoints); non-reentrant, which FSDP2 and DDP both support.
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    engine: nn.Module = CausalLMLoss(model)
    if strategy == "ddp":
        if runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            engine = DistributedDataParallel(engine, device_ids=device_ids)
    else:
        _shard(model, engine, runtime, cfg.offload_optimizer)
        if source is not None:
            _materialize(model, engine, source, runtime, cfg.offload_optimizer)
        # FSDP makes the first module that runs forward the root; the model may be called
        # before the engine (the init's validation, the pretrained check): set it now.
        assert isinstance(engine, FSDPModule)
        engine._get_fsdp_state()._lazy_init()
    parallel = Parallel(strategy, model, engine, runtime.device)
    setattr(model, _PLACED, parallel)
    return parallel


def _materialize(
    model: PreTrainedModel, root: nn.Module, source: Path, runtime: Runtime, offload: bool
) -> None:
    """Storage for this rank's shards of a meta-device model, filled from ``source``."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # real, computed
    # On the root, whose own group (embeddings, final norm, output layer) resets its shards.
    root.to_empty(device=torch.device("cpu") if offload else runtime.device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    read = fill_shards(model, source)
    log.info("train.loaded_shards", folder=str(source), gib_this_rank=round(read / 2**30, 3))


def _shard(model: PreTrainedModel, root: nn.Module, runtime: Runtime, offload: bool) -> None:
    if not dist.is_initialized():  # fsdp in one process (to offload): a group of one
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        store = dist.HashStore()  # type: ignore[attr-defined]  # exported, not declared so
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    # bf16 weights in compute, gradients reduced in fp32 (as autocast computes); fp32 on CPU.
    low = runtime.autocast_dtype
    precision = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    offloading = CPUOffloadPolicy(pin_memory=runtime.device.type == "cuda") if offload else None
    policy = offloading or OffloadPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision, offload_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=precision, offload_policy=policy)
    log.info("train.sharded", blocks=len(blocks), ranks=runtime.world_size)
    # Validation calls the model itself, not the root: let FSDP gather the root's group (the
    # embeddings, the final norm, the output layer) around such calls too.
    assert isinstance(root, FSDPModule)
    model.register_forward_pre_hook(_calling(root.unshard))
    model.register_forward_hook(_calling(root.reshard))


def _calling(action: Callable[[], object]) -> Callable[..., None]:
    def hook(*_: object) -> None:
        action()

    return hook


def _plain_copy(model: PreTrainedModel, device: torch.device | None) -> PreTrainedModel | None:
    """A plain model with the sharded ``model``'s full weights, gathered one tensor at a time
    by torch's state-dict API: on ``device`` on every rank, or (None) in host memory on rank 0
    only."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=device is None)
    weights = get_model_state_dict(model, options=options)
    if not weights:
        return None
    with no_init_weights():  # every weight is loaded below: skip the random initialisation
        plain: PreTrainedModel = AutoModelForCausalLM.from_config(model.config)
    plain.to(device or torch.device("cpu")).load_state_dict(weights)
    plain.tie_weights()
    return plain.train(model.training)


def _by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """A state from ``optimizer.state_dict()`` (checkpoints before strategies: keyed by the
    parameters' positions in ``optimizer``) keyed by their names, as torch's API keys it."""
    if not state["state"] or not all(isinstance(k, int) for k in state["state"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {ordered[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def device_memory(runtime: Runtime) -> int:
    """Bytes of the smallest rank's device: the GPU's, or a node's host memory over its ranks.
    The smallest, agreed by all ranks: ranks that chose differently would wait forever."""
    if runtime.device.type == "cuda":
        memory = int(torch.cuda.get_device_properties(runtime.device).total_memory)
    else:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = host // int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size))
    if runtime.distributed:
        smallest = torch.tensor([memory], dtype=torch.int64, device=runtime.device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        memory = int(smallest.item())
    return memory

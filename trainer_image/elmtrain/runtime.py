"""Where training runs: the device, the autocast dtype and the (optional) DDP process group."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from elmtrain.config import TrainingConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA; fp32 (no autocast) on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the other ranks, which then find what it wrote.

        For preparing text: ranks tokenizing one file at once would each commit its token
        folder, and a commit un-commits the folder before it writes (elmcore commit_dir), so a
        rank could find it without its marker. Every rank must enter the block."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank; every rank must call it at the same point."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def setup_runtime(training: TrainingConfig | None = None) -> Runtime:
    """Pick the device and join the process group when started by ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("ELMTRAIN_DEVICE", "auto") != "cpu"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    precision = training.precision if training else "auto"
    bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    return Runtime(
        device=device,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()

"""Sharded checkpoints (torch.distributed.checkpoint) move between world sizes: one process's
checkpoint loads into two fsdp ranks (gloo, CPU), theirs loads back into one process, exactly;
a corrupt or uncommitted one is refused.

The two ranks are this file run as a script under ``elmtrain.run.launch``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_fsdp import run_two_ranks

LLAMA = {"family": "llama", "d_model": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "context_length": 32, "tie_embeddings": False}  # fmt: skip
VOCAB = 256


def setup(strategy: str) -> tuple[Any, Any, Any]:
    """A tiny Llama under ``strategy`` in this process's runtime, its optimizer, its engine."""
    from elmtrain.config import ModelConfig, TrainingConfig
    from elmtrain.model.families import build_model
    from elmtrain.run.parallel import parallelize
    from elmtrain.run.train import _optimizer
    from elmtrain.runtime import setup_runtime

    cfg = TrainingConfig(strategy=strategy)
    model = build_model(ModelConfig.model_validate(LLAMA), VOCAB, 0, seed=0)
    parallel = parallelize(model, cfg, setup_runtime(cfg))
    return parallel, _optimizer(model, cfg), parallel.engine


def step(engine: Any, optimizer: Any) -> None:
    """One optimizer step on a fixed batch (the same on every rank: the mean gradient over the
    ranks is then one process's gradient)."""
    import torch

    batch = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    engine(batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_state(parallel: Any, optimizer: Any) -> dict[str, Any]:
    """The whole model and optimizer state (on rank 0; every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(parallel.model, options=options)
    return {"model": model, "optimizer": parallel.optimizer_state(optimizer).get("state", {})}


def worker(root: Path) -> None:
    """Two fsdp ranks: load one process's checkpoint, record it, step, save a sharded one."""
    import torch
    import torch.distributed as dist

    from elmcore.storage.factory import open_storage
    from elmtrain.run.sharded_checkpoint import load_sharded, save_sharded

    storage = open_storage(root.as_uri())
    parallel, optimizer, engine = setup("fsdp")
    state = load_sharded(storage, "one", parallel.model, optimizer)
    loaded = full_state(parallel, optimizer)
    step(engine, optimizer)
    save_sharded(storage, "two", state["step"] + 1, parallel.model, optimizer, {"step": 2})
    after = full_state(parallel, optimizer)
    if dist.get_rank() == 0:
        torch.save({"loaded": loaded, "after": after}, root / "ranks.pt")
    dist.destroy_process_group()


def assert_same(one: dict[str, Any], two: dict[str, Any], exact: bool = True) -> None:
    import torch

    assert one["model"].keys() == two["model"].keys()
    assert one["optimizer"].keys() == two["optimizer"].keys() == one["model"].keys()
    pairs = [(one["model"][k], two["model"][k]) for k in one["model"]]
    for name, moments in one["optimizer"].items():
        pairs += [(moments[m], two["optimizer"][name][m]) for m in ("exp_avg", "exp_avg_sq")]
    for a, b in pairs:
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sharded_checkpoints_move_between_one_and_two_ranks(tmp_path: Path) -> None:
    import torch

    from elmcore.errors import IntegrityError
    from elmcore.storage.factory import open_storage
    from elmtrain.run.sharded_checkpoint import load_sharded, save_sharded

    storage = open_storage(tmp_path.as_uri())
    parallel, optimizer, engine = setup("ddp")
    step(engine, optimizer)
    save_sharded(storage, "one", 1, parallel.model, optimizer, {"step": 1})
    saved = full_state(parallel, optimizer)

    run_two_ranks("tests.trainer.test_sharded_checkpoint", tmp_path)
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert_same(saved, ranks["loaded"])  # one process -> two ranks' shards, exactly
    assert (tmp_path / "two" / "__1_0.distcp").is_file()  # rank 1 wrote its own shards

    # Two ranks -> one process, exactly; and the ranks' step after loading is this one's.
    fresh, fresh_optimizer, _ = setup("ddp")
    assert load_sharded(storage, "two", fresh.model, fresh_optimizer) == {"step": 2}
    assert_same(full_state(fresh, fresh_optimizer), ranks["after"])
    step(engine, optimizer)
    assert_same(full_state(parallel, optimizer), ranks["after"], exact=False)

    # A flipped byte in one rank's shards, or no commit marker: refused, never loaded.
    shard = tmp_path / "two" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_sharded(storage, "two", fresh.model, fresh_optimizer)
    (tmp_path / "one" / "COMMITTED.json").unlink()
    with pytest.raises(IntegrityError, match="not committed"):
        load_sharded(storage, "one", fresh.model, fresh_optimizer)


if __name__ == "__main__":  # the two ranks of the test above
    import os

    os.environ.setdefault("ELMTRAIN_DEVICE", "cpu")
    worker(Path(sys.argv[1]))

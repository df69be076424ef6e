"""Pretrained weights into fsdp shards without a whole copy per rank, and streamed exports
(issue 27, points 2 and 4), on two CPU ranks (gloo).

Each launch runs this file as two ranks (``run_two_ranks``); what it should do is in
``job.json`` beside its results. The folders the ranks read are written by the test first:
Hugging Face sharded safetensors in bf16, as pretrained models come.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_fsdp import RTOL, VOCAB, RecordingReporter, run_two_ranks

TINY = {
    # 33 positions: rank 0 holds 17 rows of the position embeddings, rank 1 16.
    "gpt2": {"family": "gpt2", "d_model": 48, "n_layers": 2, "n_heads": 2, "context_length": 33},
    "llama": {"family": "llama", "d_model": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
              "context_length": 32, "tie_embeddings": False},
}  # fmt: skip
# Some tens of MB: 33.9M parameters, 68 MB in bf16 on disk, 136 MB in fp32 in memory.
LARGE = {"family": "llama", "d_model": 512, "n_layers": 8, "n_heads": 8, "context_length": 64,
         "ffn_multiplier": 2.6875, "tie_embeddings": False}  # fmt: skip
LARGE_VOCAB = 8192


def write_pretrained(
    folder: Path, settings: dict[str, Any], vocab: int, shard: str, seed: int = 0
) -> int:
    """A freshly initialised model saved as a pretrained one: bf16, sharded; its parameters."""
    import torch

    from elmtrain.config import ModelConfig
    from elmtrain.model.families import build_model

    model = build_model(ModelConfig.model_validate(settings), vocab, 0, seed=seed)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
    return sum(p.numel() for p in model.parameters())


def _cfg(strategy: str) -> Any:
    from elmtrain.config import TrainingConfig

    return TrainingConfig(steps=4, batch_size=8, micro_batch_size=2, seq_len=32, warmup_steps=1,
                          learning_rate=1e-2, grad_clip=0.5, checkpoint_interval=100,
                          strategy=strategy)  # fmt: skip


def _train(model: Any, strategy: str, out: Path, run_id: str) -> tuple[list[float], Any]:
    import torch

    from elmcore.storage.factory import open_storage
    from elmtrain.run.checkpoint import Checkpointer
    from elmtrain.run.train import train
    from elmtrain.runtime import setup_runtime

    cfg = _cfg(strategy)
    runtime = setup_runtime(cfg)
    starts = torch.randint(0, VOCAB, (64, 1), generator=torch.Generator().manual_seed(1))
    sequences = (starts + torch.arange(32)) % VOCAB
    reporter = RecordingReporter()
    checkpointer = Checkpointer(open_storage((out / "checkpoints").as_uri()), run_id)
    outcome = train(model, sequences, cfg, runtime, checkpointer, reporter)
    return reporter.losses, outcome.model


def train_and_export(out: Path, family: str) -> dict[str, Any]:
    """A rank's part: shards loaded from the folder equal the whole model's rows; fsdp from
    the lazily built model trains as ddp from the whole one; the trained shards export."""
    import torch
    import torch.distributed as dist

    from elmtrain.model.families import load_model
    from elmtrain.run.export import export_model
    from elmtrain.run.parallel import place
    from elmtrain.run.sharded_load import lazy_model
    from elmtrain.runtime import setup_runtime

    folder = out / f"pretrained-{family}"
    runtime = setup_runtime(_cfg("fsdp"))
    whole = load_model(folder)
    lazy = lazy_model(folder)
    assert lazy is not None
    sharded = place(lazy, _cfg("fsdp"), runtime)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    shards_equal = all(
        torch.equal(param.to_local(), torch.chunk(whole.get_parameter(name), ranks)[rank])
        for name, param in sharded.named_parameters()
    )
    tied = sharded.get_output_embeddings().weight is sharded.get_input_embeddings().weight
    fsdp_losses, trained = _train(sharded, "fsdp", out, f"fsdp-{family}")
    ddp_losses, _ = _train(whole, "ddp", out, f"ddp-{family}")
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    trained.eval()
    with torch.no_grad():
        logits = trained(input_ids=ids).logits
    exported = out / f"export-{family}"
    export_model(trained, exported, runtime, max_shard_bytes=40_000)  # several files
    if rank == 0:
        torch.save({"ids": ids, "logits": logits}, out / f"logits-{family}.pt")
    return {"shards_equal": shards_equal, "tied": tied, "fsdp": fsdp_losses, "ddp": ddp_losses}


def shards_equal(folder: Path, offload: bool = False) -> bool:
    """The folder loads into this rank's shards (the optimizer offloaded or not) exactly:
    used for a branch's init as ``average_models`` writes it (two experts, weighted)."""
    import torch
    import torch.distributed as dist

    from elmtrain.model.families import load_model
    from elmtrain.run.parallel import place
    from elmtrain.run.sharded_load import lazy_model
    from elmtrain.runtime import setup_runtime

    cfg = _cfg("fsdp").model_copy(update={"offload_optimizer": offload})
    lazy = lazy_model(folder)
    assert lazy is not None
    sharded = place(lazy, cfg, setup_runtime(cfg))
    whole = load_model(folder)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    return all(
        torch.equal(param.to_local(), torch.chunk(whole.get_parameter(name), ranks)[rank])
        for name, param in sharded.named_parameters()
    )


def measure(out: Path, mode: str) -> dict[str, Any]:
    """Peak RSS growth of this rank while loading the large folder (``lazy``: into fsdp
    shards; ``whole``: whole per rank, as before) and, lazily loaded, rank 0's while exporting."""
    from elmtrain.model.families import load_model
    from elmtrain.run.export import export_model
    from elmtrain.run.parallel import _plain_copy, place
    from elmtrain.run.sharded_load import lazy_model
    from elmtrain.runtime import setup_runtime
    from tests.harness.peakrss import peak_growth_kib

    folder = out / "pretrained-large"
    runtime = setup_runtime(_cfg("fsdp"))
    loaded: list[Any] = []
    if mode == "whole":
        return {"load_kib": peak_growth_kib(lambda: loaded.append(load_model(folder)))}

    def load() -> None:
        lazy = lazy_model(folder)
        assert lazy is not None
        loaded.append(place(lazy, _cfg("fsdp"), runtime))

    load_kib = peak_growth_kib(load)
    export_kib = peak_growth_kib(lambda: export_model(loaded[0], out / "export-large", runtime))
    # What exports did before (``Parallel.unwrap``): the whole state gathered, then a plain
    # model (measured last, so freed memory it reuses makes this an underestimate).
    before_kib = peak_growth_kib(lambda: _plain_copy(loaded[0], None))
    return {"load_kib": load_kib, "export_kib": export_kib, "plain_copy_kib": before_kib}


def largest_tensor(out: Path) -> dict[str, Any]:
    """The most bytes a tensor of this rank ever held (a DTensor: its local part; meta
    tensors hold no memory) from placing the lazy model to the end of the export: what
    ``seed --pretrained`` does after building it (read the shards, check the loss, export).
    Every tensor an operation creates passes through the dispatcher, so this counts what a
    rank materialises, exactly. (Building the lazy model is left out: ``from_config`` makes
    each parameter with ``torch.empty``, pages never touched, and moves it to meta at once.)"""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    from elmtrain.model.families import check_trainable
    from elmtrain.run.export import export_model
    from elmtrain.run.parallel import place, placed
    from elmtrain.run.sharded_load import lazy_model
    from elmtrain.runtime import setup_runtime

    class Largest(TorchDispatchMode):
        bytes, op = 0, ""

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
            result = func(*args, **(kwargs or {}))
            for value in result if isinstance(result, (tuple, list)) else [result]:
                local = value.to_local() if isinstance(value, DTensor) else value
                if isinstance(local, torch.Tensor) and local.device.type != "meta":
                    size = local.numel() * local.element_size()
                    if size > Largest.bytes:
                        Largest.bytes, Largest.op = size, str(func)
            return result

    cfg = _cfg("fsdp")
    runtime = setup_runtime(cfg)
    found = {}
    for name in ("pretrained-wide", "averaged-wide"):  # a seed's folder, a branch's init
        lazy = lazy_model(out / name)
        assert lazy is not None
        Largest.bytes = 0
        with Largest():
            model = place(lazy, cfg, runtime)
            parallel = placed(model)
            assert parallel is not None
            check_trainable(model, "wide", loss=parallel.engine)
            export_model(model, out / f"export-{name}", runtime, max_shard_bytes=1 << 20)
        found[name] = {"largest_bytes": Largest.bytes, "op": Largest.op}
    return found


def worker(out: Path) -> None:
    import torch.distributed as dist

    job = json.loads((out / "job.json").read_text())
    if job["what"] == "train":
        result = {family: train_and_export(out, family) for family in TINY}
        result["averaged_shards_equal"] = shards_equal(out / "averaged-gpt2")
        result["offloaded_shards_equal"] = shards_equal(out / "pretrained-llama", offload=True)
    elif job["what"] == "largest":
        result = largest_tensor(out)
    else:
        result = measure(out, job["what"])
    (out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _launch(out: Path, what: str) -> list[dict[str, Any]]:
    (out / "job.json").write_text(json.dumps({"what": what}))
    run_two_ranks("tests.trainer.test_fsdp_load", out)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


def test_pretrained_folder_loads_into_shards_trains_as_ddp_and_exports(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from elmtrain.model.averaging import average_models

    for family, settings in TINY.items():
        write_pretrained(tmp_path / f"pretrained-{family}", settings, VOCAB, "40KB")
        assert (tmp_path / f"pretrained-{family}" / "model.safetensors.index.json").is_file()
    write_pretrained(tmp_path / "other-gpt2", TINY["gpt2"], VOCAB, "40KB", seed=1)
    experts = [tmp_path / "pretrained-gpt2", tmp_path / "other-gpt2"]
    average_models(experts, [0.7, 0.3], tmp_path / "averaged-gpt2")
    ranks = _launch(tmp_path, "train")
    assert all(rank["averaged_shards_equal"] for rank in ranks)
    assert all(rank["offloaded_shards_equal"] for rank in ranks)  # storage made on the host
    for family in TINY:
        for rank in ranks:
            result = rank[family]
            assert result["shards_equal"], family  # each rank's rows of every tensor, exactly
            assert result["tied"] == (family == "gpt2"), family
            assert len(result["fsdp"]) == 4
            # fp32 on CPU: only the order of the gradients' sums differs from ddp's.
            assert result["fsdp"] == pytest.approx(result["ddp"], rel=RTOL), family
        exported = tmp_path / f"export-{family}"
        index = json.loads((exported / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # sharded as save_pretrained shards
        model, info = AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
        assert not any(info.values()), info  # every tensor under its plain name, none missing
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == (family == "gpt2")
        expected = torch.load(tmp_path / f"logits-{family}.pt")
        with torch.no_grad():
            logits = model(input_ids=expected["ids"]).logits
        # The trained run computed GPT-2's gelu with the fused kernel (model/kernels.py).
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_loading_and_exporting_hold_no_whole_copy_per_rank(tmp_path: Path) -> None:
    """Peak RSS per rank while a 34M-parameter bf16 folder (68 MB; 136 MB as fp32 weights)
    loads into two fsdp ranks, against loading it whole on each rank; rank 0's while the
    shards export."""
    parameters = write_pretrained(tmp_path / "pretrained-large", LARGE, LARGE_VOCAB, "20MB")
    copy_kib = parameters * 4 // 1024  # one fp32 copy of the weights
    lazy = _launch(tmp_path, "lazy")
    whole = _launch(tmp_path, "whole")
    figures = {"copy_mib": copy_kib // 1024,
               "lazy_load_mib": [r["load_kib"] // 1024 for r in lazy],
               "whole_load_mib": [r["load_kib"] // 1024 for r in whole],
               "export_rank0_mib": lazy[0]["export_kib"] // 1024,
               "plain_copy_rank0_mib": lazy[0]["plain_copy_kib"] // 1024}  # fmt: skip
    print(json.dumps(figures))  # the figures docs/trainer.md states (pytest -s shows them)
    # Half a copy of shards each, plus fixed costs (building the model's modules, the process
    # group, one read slice: about 20 MiB a rank, which larger models amortise).
    for rank in lazy:
        assert rank["load_kib"] < 0.75 * copy_kib, figures
    assert sum(r["load_kib"] for r in lazy) < 1.5 * copy_kib, figures  # the node: ~one copy
    assert all(r["load_kib"] > 0.9 * copy_kib for r in whole), figures  # what it replaces
    # Rank 0 holds its shards already: exporting adds one gathered tensor at a time (the
    # largest, the embeddings, is 16 MiB) and the collective's buffers, never a whole copy.
    assert lazy[0]["export_kib"] < 0.6 * copy_kib, figures
    assert lazy[0]["plain_copy_kib"] > copy_kib, figures  # the path it replaces
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "export-large")  # loads


def test_no_rank_ever_holds_a_whole_tensor_from_load_to_export(tmp_path: Path) -> None:
    """``seed --pretrained``'s path on 2 ranks (shards read, the loss check, the streamed
    export), and a branch's averaged init placed the same way, never creates a tensor larger
    than a rank's shard of the largest parameter: no rank gathers a whole vocabulary matrix,
    let alone the model (before, the check's forward passes and the export's ``full_tensor``
    gathered the embeddings whole on every rank, 2x this bound). Bytes of tensors counted, not
    memory read: no allocator, machine or timing in it."""
    import torch
    from transformers import AutoModelForCausalLM

    from elmtrain.model.averaging import average_models
    from elmtrain.model.families import load_model

    vocab = 4096  # the embeddings (4096 x 48) dwarf every other tensor of this model
    write_pretrained(tmp_path / "pretrained-wide", TINY["llama"], vocab, "100KB")
    write_pretrained(tmp_path / "other-wide", TINY["llama"], vocab, "100KB", seed=1)
    # A branch's init as branch_init writes it (streamed), placed the same way.
    experts = [tmp_path / "pretrained-wide", tmp_path / "other-wide"]
    average_models(experts, [0.6, 0.4], tmp_path / "averaged-wide")
    ranks = _launch(tmp_path, "largest")
    shard = -(-vocab // 2) * int(TINY["llama"]["d_model"]) * 4  # fp32 bytes of a rank's rows
    for folder in ("pretrained-wide", "averaged-wide"):
        sizes = [rank[folder]["largest_bytes"] for rank in ranks]
        assert all(0 < size <= shard for size in sizes), (folder, ranks, shard)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / f"export-{folder}")
        original = load_model(tmp_path / folder)
        for name, tensor in original.state_dict().items():
            assert torch.equal(exported.state_dict()[name], tensor), (folder, name)


if __name__ == "__main__":  # a rank of the launches above
    os.environ.setdefault("ELMTRAIN_DEVICE", "cpu")
    worker(Path(sys.argv[1]))


def test_seed_and_branch_from_a_pretrained_folder_under_fsdp_through_the_cli(
    tmp_path: Path, corpus: Path
) -> None:
    """The real commands on two ranks: ``seed --pretrained`` (a bf16 Llama folder) reads each
    rank's shards, checks the model's own loss against elmtrain's on the sharded model, and
    commits a streamed export; ``branch`` loads that seed the same way."""
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM

    from elmtrain.forest import Forest
    from tests.conftest import training
    from tests.trainer.test_ddp import two_rank_command
    from tests.trainer.test_pretrained import pretrained_forest

    forest = pretrained_forest(tmp_path, "llama", torch.bfloat16, "sentencepiece")
    cooking = corpus / "cooking"
    settings = training(steps=8, seq_len=32, learning_rate=1e-2, strategy="fsdp")
    commands = {
        "seed": ["seed", "--pretrained", str(tmp_path / "hf-model")],
        "branch": ["branch", "--domain", "cooking", "--init", "seed"],
    }
    for command, args in commands.items():
        # Into the local cache first: two ranks fetching a folder into a cold cache at once
        # race (as test_fsdp's CLI test notes).
        opened = Forest.open(str(forest))
        opened.tokenizer_dir()
        if command == "branch":
            opened.seed_dir()
        launch = two_rank_command("--local-ranks-filter=0", "-m", "elmtrain", *args,
                                  "--forest", str(forest), "--data", str(cooking / "train.txt"),
                                  "--val-data", str(cooking / "valid.txt"),
                                  "--training", settings, "--merge")  # fmt: skip
        done = subprocess.run(launch, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        lines = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
        events = {line["event"]: line for line in lines}
        assert events["train.strategy"]["strategy"] == "fsdp", command
        assert "train.loaded_shards" in events, command  # not loaded whole
        assert "export.streamed" in events, command
    for folder in (forest / "seed", forest / "experts" / "cooking" / "v1"):
        _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), info
    metrics = json.loads((forest / "experts" / "cooking" / "v1" / "metrics.json").read_text())
    assert metrics["val_loss_after"] < metrics["val_loss_before"]


def test_a_posterior_branch_on_two_ranks_scores_its_prior_on_rank_0_alone(
    tmp_path: Path, corpus: Path
) -> None:
    """``branch --init posterior`` under fsdp: scoring the prior loads every expert whole, so
    rank 0 alone scores it and sends it to rank 1 (one model on the node, not one per rank);
    both ranks start from the same posterior-weighted average, recorded in init.json."""
    import subprocess

    import torch

    from elmcore import layout
    from elmcore.manifest import Manifest
    from elmtrain.forest import Forest
    from tests.conftest import training
    from tests.trainer.test_ddp import two_rank_command
    from tests.trainer.test_pretrained import pretrained_forest

    forest = pretrained_forest(tmp_path, "llama", torch.float32, "sentencepiece")
    settings = training(steps=4, seq_len=32, learning_rate=1e-2, strategy="fsdp")
    runs = [
        ["seed", "--pretrained", str(tmp_path / "hf-model")],
        ["branch", "--domain", "cooking", "--init", "seed"],
        ["branch", "--domain", "sailing", "--init", "seed"],
        ["branch", "--domain", "finance", "--init", "posterior"],
    ]
    for args in runs:
        opened = Forest.open(str(forest))  # a warm cache: see the test above
        opened.tokenizer_dir()
        if args[0] == "branch":
            opened.seed_dir()
            for entry in opened.manifest().sorted_experts():
                opened.fetch(entry)
        data = corpus / (args[2] if args[0] == "branch" else "cooking")
        launch = two_rank_command("-m", "elmtrain", *args, "--forest", str(forest),
                                  "--data", str(data / "train.txt"),
                                  "--val-data", str(data / "valid.txt"),
                                  "--training", settings, "--merge")  # fmt: skip
        done = subprocess.run(launch, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(x[x.index("{") :]) for x in done.stderr.splitlines() if "{" in x]
    scored = [line for line in lines if line.get("event") == "branch.prior_scored"]
    assert [line["rank"] for line in scored] == [0], scored  # once, by rank 0
    manifest = Manifest.model_validate_json((forest / "manifest.json").read_text())
    run_id = manifest.experts["finance"].run_id
    init = json.loads((forest / layout.run(run_id) / "init.json").read_text())
    assert sorted(init["prior"]) == ["cooking", "sailing"]
    assert abs(sum(init["prior"].values()) - 1) < 1e-6
    assert sorted(p["domain"] for p in init["parents"]) == ["cooking", "sailing"]

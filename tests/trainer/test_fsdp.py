"""Sharded training (FSDP2) on two CPU ranks (gloo) computes what one process and DDP compute.

One launch of two ranks (this file run as a script under ``elmtrain.run.launch``) trains tiny
GPT-2 (tied embeddings), Llama and GPT-NeoX models with ``train()`` under ddp and fsdp, with
gradient accumulation, clipping, validation and a checkpoint (sharded under fsdp), then resumes
the fsdp runs from their checkpoints; the test trains the same runs in one process, compares
every step's loss, and resumes the fsdp checkpoints in one process too. Then the real CLI: a
``seed`` with ``strategy: fsdp`` on two ranks, sent SIGTERM, checkpoints, exits 75, resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from elmcore.errors import ExitCode
from elmcore.sharding import choose_strategy, training_state_bytes
from tests.conftest import TINY_MODEL, elmtrain, training
from tests.trainer.test_ddp import two_rank_command

STEPS = 4
VOCAB = 256
# fp32 on CPU: sharding changes only the order of the gradients' sums (reduce-scatter against
# all-reduce), so the per-step losses agree to float rounding, well inside this.
RTOL = 1e-4
FAMILIES = {
    "gpt2": {"family": "gpt2", "d_model": 48, "n_layers": 2, "n_heads": 2, "context_length": 32},
    "llama": {
        "family": "llama",
        "d_model": 48,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "context_length": 32,
        "tie_embeddings": False,
    },
    # Built from transformers' config (elmtrain builds it only from pretrained folders), with
    # a Pythia-style vocabulary padded past the tokens used.
    "gpt_neox": {"vocab_size": 384, "hidden_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 32},
}  # fmt: skip


class RecordingReporter:
    """A progress reporter that takes every step's loss (the real one writes at intervals)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def due(self, force: bool = False) -> bool:
        return True

    def report(self, progress: Any, force: bool = False) -> None:
        if progress.loss is not None:
            self.losses.append(progress.loss)

    def in_background(self) -> Any:
        from contextlib import nullcontext

        return nullcontext()


# The two-rank runs: (name, family, settings). Activation checkpointing changes what backward
# recomputes and offloading where the shards live, not the math: same reference.
RUNS = [
    ("gpt2/ddp", "gpt2", {"strategy": "ddp"}),
    ("gpt2/fsdp", "gpt2", {"strategy": "fsdp", "activation_checkpointing": True}),
    ("llama/ddp", "llama", {"strategy": "ddp"}),
    ("llama/fsdp", "llama", {"strategy": "fsdp"}),
    ("llama/fsdp-offload", "llama", {"strategy": "fsdp", "offload_optimizer": True}),
    ("gpt_neox/fsdp", "gpt_neox", {"strategy": "fsdp"}),
]


def build(family: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from elmtrain.config import ModelConfig
    from elmtrain.model.families import build_model

    if family == "gpt_neox":
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(GPTNeoXConfig(**FAMILIES[family]))
    return build_model(ModelConfig.model_validate(FAMILIES[family]), VOCAB, 0, seed=0)


def run_training(
    family: str, settings: dict[str, Any], checkpoints: Path, run_id: str, runs: int = 2
) -> dict[str, Any]:
    """``train()`` of a tiny ``family`` model with ``settings`` in this process's runtime;
    its per-step losses, and (``runs=2``) those of a second run resumed from the first one's
    checkpoint."""
    import torch
    from torch.distributed.tensor import DTensor

    from elmcore.storage.factory import open_storage
    from elmtrain.config import TrainingConfig
    from elmtrain.run.checkpoint import Checkpointer
    from elmtrain.run.train import train
    from elmtrain.runtime import setup_runtime

    cfg = TrainingConfig(
        steps=STEPS,
        batch_size=8,
        micro_batch_size=2,  # two micro-batches per rank, one per process: accumulation
        seq_len=32,
        warmup_steps=1,
        learning_rate=1e-2,
        grad_clip=0.5,  # small enough to clip: the norm is reduced over the shards
        checkpoint_interval=2,
        eval_interval=2,
        **settings,
    )
    runtime = setup_runtime(cfg)
    # Counting from a random start: learnable in a few steps, so the losses move.
    starts = torch.randint(0, VOCAB, (68, 1), generator=torch.Generator().manual_seed(1))
    rows = (starts + torch.arange(32)) % VOCAB
    sequences, val = rows[:64], rows[64:]
    checkpointer = Checkpointer(
        open_storage(checkpoints.as_uri()), run_id.replace("/", "-").replace("_", "-")
    )
    records = []
    for _ in range(runs):  # the second resumes from the first's checkpoint at step 2
        model = build(family)
        reporter = RecordingReporter()
        outcome = train(model, sequences, cfg, runtime, checkpointer, reporter, val)
        trained = outcome.model
        tied = trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
        records.append(
            {
                "losses": reporter.losses,
                "curve": [p.loss for p in outcome.curve],
                "tied": tied,
                # Under fsdp the trained model stays sharded (exports stream from it).
                "weights": float(
                    sum(
                        (p.full_tensor() if isinstance(p, DTensor) else p).double().abs().sum()
                        for p in trained.parameters()
                    )
                ),
            }
        )
    return {"run": records[0], "resumed": records[-1]}


def worker(out: Path) -> None:
    """A rank of the two-process launch: every family under both strategies."""
    import torch.distributed as dist

    results = {
        # Resumed from its checkpoint: fsdp's runs (ddp's resume is tests/trainer/test_resume.py's).
        name: run_training(family, settings, out / "checkpoints", name, runs=1 + ("fsdp" in name))
        for name, family, settings in RUNS
    }
    (out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def rank_mean(ranks: list[dict[str, Any]], key: str, run: str) -> dict[str, Any]:
    """One run's record with each step's loss the mean over the ranks' (each reports the loss
    of its own half of the batch; one process reports the whole batch's)."""
    records = [r[key][run] for r in ranks]
    losses = [sum(step) / len(step) for step in zip(*(r["losses"] for r in records), strict=True)]
    return {**records[0], "losses": losses}


def run_two_ranks(module: str, folder: Path) -> None:
    """``python -m module folder`` as two gloo ranks (the module's ``__main__`` part); both
    must exit 0."""
    launch = subprocess.run(
        two_rank_command("-m", module, str(folder)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert launch.returncode == 0, launch.stderr[-4000:]


def test_fsdp_losses_match_one_process_and_ddp(tmp_path: Path) -> None:
    run_two_ranks("tests.trainer.test_fsdp", tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for name, *_ in RUNS:  # fsdp checkpoints are each rank's shards; ddp's the whole model
        run_id = name.replace("/", "-").replace("_", "-")
        step_2 = tmp_path / "checkpoints" / "runs" / run_id / "checkpoints" / "step-00000002"
        files = {p.name for p in step_2.iterdir()}
        sharded = {"metadata.dcp", "__0_0.distcp", "__1_0.distcp"}
        assert sharded <= files if "fsdp" in name else "model.safetensors" in files, files
    for family in FAMILIES:
        single = run_training(family, {}, tmp_path / "single", family, runs=1)["run"]
        assert len(single["losses"]) == STEPS
        assert single["losses"][-1] < single["losses"][0] - 0.1  # it learns
        assert single["tied"] == (family == "gpt2")
        for name in (name for name, of, _ in RUNS if of == family):
            run, resumed = (rank_mean(ranks, name, r) for r in ("run", "resumed"))
            assert run["losses"] == pytest.approx(single["losses"], rel=RTOL), name
            assert run["curve"] == pytest.approx(single["curve"], rel=RTOL), name
            assert run["weights"] == pytest.approx(single["weights"], rel=RTOL), name
            assert run["tied"] == single["tied"], name  # the returned model is tied again
            if "fsdp" in name:  # resumed at step 2 from the checkpoint its ranks gathered
                assert resumed["losses"] == pytest.approx(single["losses"][2:], rel=RTOL), name
        # One process resumes the two ranks' fsdp checkpoint (another world size and strategy).
        moved = run_training(family, {}, tmp_path / "checkpoints", f"{family}/fsdp", runs=1)
        assert moved["run"]["losses"] == pytest.approx(single["losses"][2:], rel=RTOL)


def test_checkpoints_before_strategies_resume(tmp_path: Path) -> None:
    """An optimizer state keyed by position (``optimizer.state_dict()``, as checkpoints were
    written before) loads by parameter name into a new optimizer."""
    import torch

    from elmtrain.config import ModelConfig, TrainingConfig
    from elmtrain.model.families import build_model
    from elmtrain.run.parallel import parallelize
    from elmtrain.run.train import _optimizer
    from elmtrain.runtime import Runtime

    cfg = TrainingConfig(strategy="ddp")
    model = build_model(ModelConfig.model_validate(FAMILIES["llama"]), VOCAB, 0, seed=0)
    parallel = parallelize(model, cfg, Runtime(device=torch.device("cpu")))
    old = _optimizer(model, cfg)
    parallel.engine(torch.randint(0, VOCAB, (2, 16))).backward()
    old.step()
    model.zero_grad(set_to_none=True)  # as at a resume: before any backward
    legacy = old.state_dict()
    assert all(isinstance(key, int) for key in legacy["state"])
    new = _optimizer(model, cfg)
    parallel.load_optimizer_state(new, legacy)
    assert len(new.state) == len(old.state) > 0
    for param, state in old.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new.state[param][key], state[key])
    # And the name-keyed state it writes now loads back the same.
    named = parallel.optimizer_state(new)
    assert set(named["state"]) == {name for name, _ in model.named_parameters()}
    newer = _optimizer(model, cfg)
    parallel.load_optimizer_state(newer, named)
    for param, state in old.state.items():
        assert torch.equal(newer.state[param]["exp_avg"], state["exp_avg"])


def test_fsdp_seed_through_the_cli_checkpoints_on_sigterm_and_resumes(
    tokenizer_forest: Path, corpus: Path, forest_copy: Any
) -> None:
    """The real command on two ranks: a SIGTERM to one rank ends in one sharded checkpoint and
    exit 75 on both, as under ddp; the rerun resumes there and commits a plain Hugging Face
    model that learnt (the losses' equality is the test above)."""
    from transformers import AutoModelForCausalLM

    from elmtrain.forest import Forest
    from tests.trainer.test_ddp import stopped_at, training_started

    forest = forest_copy(tokenizer_forest, "fsdp")
    # No periodic checkpoint: the only one is preemption's; validation in mid-run at step 30.
    settings = training(steps=60, batch_size=8, checkpoint_interval=1000, eval_interval=30,
                        progress_interval_seconds=0.2, strategy="fsdp")  # fmt: skip
    sailing = corpus / "sailing"
    args = ["seed", "--forest", str(forest), "--data", str(sailing / "train.txt"), "--val-data",
            str(sailing / "valid.txt"), "--model", TINY_MODEL, "--training", settings]  # fmt: skip
    # The tokenizer in the local cache first: two ranks fetching it into a cold cache at once
    # race (each replaces the folder the other may be reading; forest.fetch), as in test_ddp,
    # whose one-process run fetches it before its two-rank ones.
    Forest.open(str(forest)).tokenizer_dir()
    run = forest / "runs" / "seed"
    process, ranks = training_started(args, run / "progress.json")
    os.kill(ranks[1].pid, signal.SIGTERM)
    stopped = stopped_at(process)  # exit 75 within the grace period, one step on both ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{stopped:08d}"]
    shards = {p.name for p in (run / "checkpoints" / f"step-{stopped:08d}").glob("*.distcp")}
    assert shards == {"__0_0.distcp", "__1_0.distcp"}  # each rank wrote its own

    # Rank 0's log only: two ranks' lines interleave mid-line on one pipe.
    launch = two_rank_command("--local-ranks-filter=0", "-m", "elmtrain", *args)
    completed = subprocess.run(launch, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [json.loads(line) for line in completed.stderr.splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines}
    assert events["checkpoint.resumed"]["step"] == stopped
    assert events["train.strategy"]["strategy"] == "fsdp"
    model, info = AutoModelForCausalLM.from_pretrained(forest / "seed", output_loading_info=True)
    assert not any(info.values()), info  # every weight under its plain name, none left over
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    metrics = json.loads((forest / "seed" / "metrics.json").read_text())
    assert metrics["steps"] == 60
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert [point["step"] for point in metrics["curve"]] == [0, 30, 60]


def test_bad_strategy_is_bad_input(tokenizer_forest: Path, corpus: Path) -> None:
    for settings, field in (
        ({"strategy": "zero3"}, "strategy"),
        ({"strategy": "ddp", "offload_optimizer": True}, "offload_optimizer"),
    ):
        args = ["--forest", str(tokenizer_forest), "--data", str(corpus)]
        completed = elmtrain("seed", *args, "--training", json.dumps(settings), check=False)
        assert completed.returncode == ExitCode.BAD_INPUT, completed.stderr[-2000:]
        last = completed.stderr.strip().splitlines()[-1]
        assert f"--training: {field}:" in last, last


GIB = 2**30


def test_auto_rule() -> None:
    # 16 bytes per parameter on every rank under ddp; fsdp divides by the world size.
    assert training_state_bytes(8 * 10**9, "ddp", 8) == 128 * 10**9
    assert training_state_bytes(8 * 10**9, "fsdp", 8) == 16 * 10**9
    # One process: never sharded, whatever its size (unless offloading, which only fsdp does).
    assert choose_strategy("auto", 70 * 10**9, 1, 80 * GIB) == "ddp"
    assert choose_strategy("auto", 10**6, 1, 80 * GIB, offload_optimizer=True) == "fsdp"
    # Several ranks on 80 GB GPUs: a 1B model's 16 GB fits beside activations, 3B's 48 GB
    # is more than half the device, so it shards.
    assert choose_strategy("auto", 10**9, 8, 80 * GIB) == "ddp"
    assert choose_strategy("auto", 3 * 10**9, 8, 80 * GIB) == "fsdp"
    # The boundary: exactly half the device still replicates.
    assert choose_strategy("auto", 40 * GIB // 16, 2, 80 * GIB) == "ddp"
    assert choose_strategy("auto", 40 * GIB // 16 + 1, 2, 80 * GIB) == "fsdp"
    # An explicit choice is kept.
    assert choose_strategy("ddp", 70 * 10**9, 8, 80 * GIB) == "ddp"
    assert choose_strategy("fsdp", 10**6, 2, 80 * GIB) == "fsdp"


def test_config_accepts_strategies_and_rejects_the_rest() -> None:
    from pydantic import ValidationError

    from elmcore.config import TrainingConfig

    assert TrainingConfig().strategy == "auto"
    assert TrainingConfig(strategy="fsdp", offload_optimizer=True).offload_optimizer
    with pytest.raises(ValidationError, match="strategy"):
        TrainingConfig.model_validate({"strategy": "zero3"})
    with pytest.raises(ValidationError, match="needs strategy fsdp"):
        TrainingConfig.model_validate({"strategy": "ddp", "offload_optimizer": True})


if __name__ == "__main__":  # a rank of test_fsdp_losses_match_one_process_and_ddp
    os.environ.setdefault("ELMTRAIN_DEVICE", "cpu")
    worker(Path(sys.argv[1]))

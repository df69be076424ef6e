"""``elmtrain mix-train`` (Branch-Train-MiX's finetuning): the mix of test_mix.py's three tiny
Llama experts, finetuned by branch training's loop with the routers' load-balancing loss;
``--router-only`` moves the routers alone; a preempted run resumes to the uninterrupted
run's weights; fsdp on two ranks trains what one process trains; bad input exits 65.

Runs are in-process (``run(args)`` of the parsed command line, no logging configured) except
the exit-code checks and the two-rank launch, which run the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from elmcore.errors import BadInputError, ExitCode, TransientError
from elmcore.records import Progress
from elmtrain.cli import build_parser
from elmtrain.model.fused_loss import CausalLMLoss
from elmtrain.run.progress import ProgressReporter
from tests.conftest import ROOT, elmtrain
from tests.trainer.test_ddp import two_rank_command
from tests.trainer.test_mix import DOMAINS, llama_forest

__all__ = ["llama_forest"]  # test_mix's module fixture: three Llama experts of one seed

# Small enough for a few seconds a run; a constant rate so the runs' losses move at once.
TRAINING = {"steps": 6, "batch_size": 4, "seq_len": 32, "warmup_steps": 0,
            "learning_rate": 1e-2, "schedule": "constant", "checkpoint_interval": 1000,
            "eval_batches": 2}  # fmt: skip
STEPS = TRAINING["steps"]


def command(*argv: str) -> dict[str, Any]:
    """``elmtrain <argv>`` in this process, without the CLI's logging configuration."""
    args = build_parser(argv[0]).parse_args(list(argv))
    result: dict[str, Any] = args.func(args)
    return result


@pytest.fixture(scope="module")
def mixed(llama_forest: Path) -> Path:
    """The three experts mixed (top-2, random router), as ``elmtrain mix`` writes it."""
    out = llama_forest.parent / "moe"
    command("mix", "--forest", str(llama_forest), "--out", str(out), "--seed", "3")
    return out


def texts(corpus: Path, split: str) -> list[str]:
    return [str(corpus / d / f"{split}.txt") for d in DOMAINS]


def mix_train(
    forest: Path, mix: Path, out: Path, corpus: Path, *extra: str, **training: object
) -> dict[str, Any]:
    return command(
        "mix-train", "--forest", str(forest), "--mix", str(mix), "--out", str(out),
        "--data", *texts(corpus, "train"), "--val-data", *texts(corpus, "valid"),
        "--training", json.dumps({**TRAINING, **training}), *extra,
    )  # fmt: skip


@contextmanager
def step_losses() -> Iterator[list[float]]:
    """Every training step's loss, as the loop reports it (a record is due every step)."""
    losses: list[float] = []
    report = ProgressReporter.report

    def recording(self: ProgressReporter, progress: Progress, force: bool = False) -> None:
        if progress.phase == "training" and progress.loss is not None:
            losses.append(progress.loss)
        report(self, progress, force)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProgressReporter, "due", lambda self, force=False: True)
        patch.setattr(ProgressReporter, "report", recording)
        yield losses


@dataclass
class Finetuned:
    out: Path
    report: dict[str, Any]
    losses: list[float]  # every step's training loss


@pytest.fixture(scope="module")
def full(llama_forest: Path, mixed: Path, corpus: Path) -> Finetuned:
    """The mix finetuned whole, in one process (test_fsdp... compares two ranks with it)."""
    out = llama_forest.parent / "full"
    with step_losses() as losses:
        report = mix_train(llama_forest, mixed, out, corpus)
    return Finetuned(out, report, losses)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert isinstance(model, MixtralForCausalLM)
    assert not any(info.values()), info  # every tensor under its name, none left over
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_the_loss_engine_adds_mixtrals_load_balancing_loss(mixed: Path) -> None:
    """With the router logits asked for, the fused loss is Mixtral's own (cross-entropy plus
    the weighted load-balancing loss); with weight 0 it is the cross-entropy alone."""
    model = AutoModelForCausalLM.from_pretrained(mixed, dtype=torch.float32)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = float(CausalLMLoss(model)(ids))  # the mix ships output_router_logits off
        model.config.output_router_logits = True
        own = model(input_ids=ids, labels=ids)
        assert own.aux_loss is not None and float(own.aux_loss) > 0
        ours = float(CausalLMLoss(model)(ids))
        assert ours == pytest.approx(float(own.loss), rel=1e-5)
        assert ours == pytest.approx(plain + 0.01 * float(own.aux_loss), rel=1e-5)
        model.config.router_aux_loss_coef = 0.0
        assert float(CausalLMLoss(model)(ids)) == pytest.approx(plain, rel=1e-6)


def test_finetuning_learns_with_the_aux_loss(
    llama_forest: Path, mixed: Path, corpus: Path, tmp_path: Path, full: Finetuned
) -> None:
    report, with_aux = full.report, full.losses
    assert len(with_aux) == STEPS
    assert with_aux[-1] < with_aux[0] - 0.2, with_aux  # it learns
    metrics = report["finetunes"][-1]["metrics"]
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    with step_losses() as without:
        mix_train(llama_forest, mixed, tmp_path / "no-aux", corpus, "--aux-loss-coef", "0")
    # The same data and init: the first step's losses differ by the aux term alone.
    assert with_aux[0] != without[0]
    assert 0 < with_aux[0] - without[0] < 0.1, (with_aux, without)  # 0.01 x (about top_k)

    # The output: a Mixtral folder with every parameter trained, its lineage extended.
    out = full.out
    before, after = weights(mixed), weights(out)
    assert all(not torch.equal(before[n], after[n]) for n in before), "a tensor did not train"
    lineage = json.loads((out / "mix.json").read_text())
    original = json.loads((mixed / "mix.json").read_text())
    assert {k: v for k, v in lineage.items() if k != "finetunes"} == {
        k: v for k, v in original.items() if k != "finetunes"
    }
    [finetune] = lineage["finetunes"]
    assert (finetune["steps"], finetune["router_only"], finetune["aux_loss_coef"]) == (
        STEPS,
        False,
        0.01,
    )
    assert finetune["mix_sha256"] == report["finetunes"][0]["mix_sha256"]
    assert [s["location"] for s in finetune["data"]] == texts(corpus, "train")
    assert all(len(s["sha256"]) == 64 for s in finetune["data"])
    config = json.loads((out / "config.json").read_text())
    assert config["output_router_logits"] is False  # on for training only
    assert (out / "tokenizer.json").is_file() and (out / "COMMITTED.json").is_file()
    # The checkpoints are gone, the run's progress says done; a rerun finds it finished.
    run = llama_forest / "runs" / finetune["run_id"]
    assert json.loads((run / "progress.json").read_text())["phase"] == "done"
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    again = mix_train(llama_forest, mixed, out, corpus)
    assert again["sha256"] == report["sha256"]


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    """The loop stays deaf to SIGTERM once asked to stop: give this process its handler back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_router_only_moves_the_routers_alone_and_resumes_exactly(
    llama_forest: Path,
    mixed: Path,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sigterm_restored: None,
) -> None:
    whole = tmp_path / "whole"
    mix_train(llama_forest, mixed, whole, corpus, "--router-only")
    before, after = weights(mixed), weights(whole)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    routers = {n for n in before if n.endswith(".mlp.gate.weight")}
    assert len(routers) == 2 and moved == routers  # every other tensor bit-identical

    # The same run preempted: SIGTERM after step 2 commits a checkpoint and stops (exit 75);
    # the rerun resumes there, the non-router weights still frozen, and ends where the
    # uninterrupted run ended, bit for bit.
    report = ProgressReporter.report

    def preempting(self: ProgressReporter, progress: Progress, force: bool = False) -> None:
        report(self, progress, force)
        if progress.phase == "training" and progress.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ProgressReporter, "due", lambda self, force=False: True)
    monkeypatch.setattr(ProgressReporter, "report", preempting)
    resumed = tmp_path / "resumed"
    with pytest.raises(TransientError, match="preempted") as stopped:
        mix_train(llama_forest, mixed, resumed, corpus, "--router-only")
    assert stopped.value.exit_code == ExitCode.TRANSIENT and int(ExitCode.TRANSIENT) == 75
    assert not resumed.exists()
    monkeypatch.undo()
    steps = list((llama_forest / "runs").glob("mix-train.*/checkpoints/step-*"))
    assert len(steps) == 1, steps
    mix_train(llama_forest, mixed, resumed, corpus, "--router-only")
    again = weights(resumed)
    assert all(torch.equal(after[n], again[n]) for n in after)
    lineage = json.loads((resumed / "mix.json").read_text())
    assert lineage["finetunes"][-1]["router_only"] is True


def test_fsdp_on_two_ranks_matches_one_process(
    llama_forest: Path, mixed: Path, corpus: Path, tmp_path: Path, full: Finetuned
) -> None:
    """Sharded per decoder layer over two gloo ranks, the finetuned mix matches one process's.
    Not exactly: each rank's load-balancing loss is over its own half of the batch (as
    transformers' and Megatron's are per micro-batch), a nonlinear function of the routing,
    so the two runs differ by more than float rounding, but little (rtol 1e-3 here)."""
    args = ["mix-train", "--forest", str(llama_forest), "--mix", str(mixed),
            "--out", str(tmp_path / "two"), "--data", *texts(corpus, "train"),
            "--val-data", *texts(corpus, "valid"),
            "--training", json.dumps({**TRAINING, "strategy": "fsdp"})]  # fmt: skip
    launch = two_rank_command("--local-ranks-filter=0", "-m", "elmtrain", *args)
    completed = subprocess.run(
        launch, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [json.loads(s) for s in completed.stderr.splitlines() if s.startswith("{")]
    events = {line["event"]: line for line in lines}
    assert events["train.strategy"]["strategy"] == "fsdp"
    assert events["train.sharded"]["blocks"] == 2  # Mixtral's two decoder layers
    two = json.loads((tmp_path / "two" / "mix.json").read_text())["finetunes"][-1]["metrics"]
    one = full.report["finetunes"][-1]["metrics"]
    print(
        "val loss after, one process and two fsdp ranks:",
        one["val_loss_after"],
        two["val_loss_after"],
    )
    assert two["val_loss_before"] == pytest.approx(one["val_loss_before"], rel=1e-6)
    assert two["val_loss_after"] == pytest.approx(one["val_loss_after"], rel=1e-3)
    assert two["val_loss_after"] < two["val_loss_before"] - 0.1


def test_bad_input_exits_65_naming_the_field(
    llama_forest: Path, mixed: Path, corpus: Path, tmp_path: Path
) -> None:
    expert = llama_forest / "experts" / DOMAINS[0] / "v1"  # a committed Llama folder
    cases = [
        (["--mix", str(expert)], "config.json model_type is 'llama', not 'mixtral'"),
        (["--mix", str(tmp_path / "nothing")], "not a committed model folder"),
        # test_mix's experts record their validation text only: no training text to default to
        (["--mix", str(mixed)], f"expert {DOMAINS[0]} v1 records no training text in its "
                                "lineage (lineage.data)"),
    ]  # fmt: skip
    for argv, message in cases:
        completed = elmtrain("mix-train", "--forest", str(llama_forest), "--out",
                             str(tmp_path / "o"), *argv, check=False)  # fmt: skip
        assert completed.returncode == ExitCode.BAD_INPUT, completed.stderr[-2000:]
        last = completed.stderr.strip().splitlines()[-1]
        assert last.startswith("elmtrain mix-train: error: ") and message in last, last
    missing = corpus / "nowhere.txt"
    with pytest.raises(BadInputError, match=r"nowhere\.txt"):
        command("mix-train", "--forest", str(llama_forest), "--mix", str(mixed), "--out",
                str(tmp_path / "o"), "--data", str(missing), "--training",
                json.dumps(TRAINING))  # fmt: skip
    assert not (tmp_path / "o").exists()

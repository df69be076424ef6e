"""Training throughput: the ``elmtrain`` loop against transformers' ``Trainer``.

    python -m bench.train                       # GPT-2 4x256, batch 16x256, 4 rounds (~10-20 min)
    python -m bench.train --quick               # a small model, 1 round (< 1 min)
    python -m bench.train --before /tmp/before  # also another checkout's loop, in the same rounds

Same model (same initial weights), same token sequences, same batch, optimizer (AdamW, weight
decay on matrices), schedule (warmup + cosine), gradient clipping and precision. ``elmtrain``
reads its sequences from token shards on local storage and writes its progress record there, as
a Job does; ``Trainer`` reads them from memory. Each tool runs in a worker process of its own,
started once; the workers take turns in rounds (a different one first each round), each round
timing whole ``train`` calls, start-up included, after one untimed warm-up round. On a GPU both
also run in bf16, with model FLOPs utilisation.

``--before DIR`` adds a third worker whose ``elmtrain`` (and ``elmcore``) come from DIR's
``trainer_image`` and ``core`` (a ``git worktree`` or ``git archive`` of an older commit): the
loop before and after a change, measured in the same rounds against the same ``Trainer``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench.common import ROOT, parser, plot_path, table, write_results

FULL = {
    "model": {"d_model": 256, "n_layers": 4, "n_heads": 4},
    "vocab": 8192,
    "batch": 16,
    "seq_len": 256,
    "steps": 30,
    "rounds": 4,
}
QUICK = {
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2},
    "vocab": 1024,
    "batch": 8,
    "seq_len": 64,
    "steps": 8,
    "rounds": 1,
}
# Peak dense bf16 tensor FLOP/s, for MFU; keyed by a substring of the device name.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def _model(scale: dict[str, Any]) -> Any:
    from elmtrain.config import ModelConfig
    from elmtrain.model.families import build_model

    config = ModelConfig(family="gpt2", context_length=scale["seq_len"], **scale["model"])
    return build_model(config, scale["vocab"], eos_id=0, seed=0)


def _config(scale: dict[str, Any], precision: str) -> Any:
    from elmtrain.config import TrainingConfig

    return TrainingConfig(
        steps=scale["steps"],
        batch_size=scale["batch"],
        seq_len=scale["seq_len"],
        warmup_steps=2,
        checkpoint_interval=10**6,
        precision=precision,
    )


def _sequences(scale: dict[str, Any]) -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (scale["batch"] * scale["steps"], scale["seq_len"])
    return torch.randint(0, scale["vocab"], shape, generator=generator)


def _shard_sequences(sequences: Any, folder: Path) -> Any:
    """The same sequences as a Job reads them: windows of a token shard on local storage."""
    import numpy as np

    from elmcore.storage import open_storage
    from elmtrain.data.shards import ShardFile, TokenSequences, TokenStream

    tokens = sequences.numpy().astype("<u2").reshape(-1)
    (folder / "tokens-00000.bin").write_bytes(tokens.tobytes())
    assert int(sequences.max()) <= np.iinfo(np.uint16).max
    stream = TokenStream(
        open_storage(str(folder)), [ShardFile("tokens-00000.bin", len(tokens))], "uint16"
    )
    return TokenSequences(stream, sequences.shape[1], "bench")


def run_elmtrain(scale: dict[str, Any], sequences: Any, precision: str) -> float:
    """Seconds for ``steps`` optimizer steps of the elmtrain loop, start-up included, with a
    Job's checkpointer and progress reporter on local storage."""
    from elmcore.storage import open_storage
    from elmtrain.run.checkpoint import Checkpointer
    from elmtrain.run.progress import ProgressReporter
    from elmtrain.run.train import train
    from elmtrain.runtime import setup_runtime

    cfg = _config(scale, precision)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        storage = open_storage(tmp)
        train(
            _model(scale),
            sequences,
            cfg,
            setup_runtime(cfg),
            Checkpointer(storage, "bench"),
            ProgressReporter(storage, "bench", cfg.progress_interval_seconds),
        )
        _synchronize()
        return time.perf_counter() - started


def run_hf_trainer(scale: dict[str, Any], sequences: Any, precision: str) -> float:
    """Seconds for the same steps with ``transformers.Trainer``, configured to match."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = _config(scale, precision)
    rows = [{"input_ids": s, "labels": s} for s in sequences]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        arguments = TrainingArguments(
            output_dir=tmp,
            max_steps=cfg.steps,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.beta1,
            adam_beta2=cfg.beta2,
            max_grad_norm=cfg.grad_clip,
            bf16=precision == "bf16",
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            seed=cfg.seed,
        )
        Trainer(model=_model(scale), args=arguments, train_dataset=rows).train()
        _synchronize()
        return time.perf_counter() - started


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flops_per_token(scale: dict[str, Any]) -> float:
    """Training FLOPs per token: 6 per parameter-token plus attention's 12 * layers * d * T
    (PaLM's appendix B), embeddings included since GPT-2 ties them to the output layer."""
    d, layers = int(scale["model"]["d_model"]), int(scale["model"]["n_layers"])
    parameters = 12 * layers * d * d + int(scale["vocab"]) * d
    return float(6 * parameters + 12 * layers * d * int(scale["seq_len"]))


def worker(tool: str, quick: bool, precision: str) -> None:
    """Serve ``run`` requests (one per stdin line) for one tool, each answered by one JSON line
    with its seconds; everything else the tool prints goes to stderr."""
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    scale = QUICK if quick else FULL
    sequences = _sequences(scale)
    with tempfile.TemporaryDirectory() as shards:
        if tool == "hf_trainer":
            run, data = run_hf_trainer, sequences
        else:
            run, data = run_elmtrain, _shard_sequences(sequences, Path(shards))
        for _ in sys.stdin:
            results.write(json.dumps({"seconds": run(scale, data, precision)}) + "\n")
            results.flush()


class Worker:
    """A tool's worker process (``worker``), started once and timed round after round."""

    def __init__(self, tool: str, quick: bool, precision: str, tree: Path | None) -> None:
        env = dict(os.environ)
        if tree is not None:  # that checkout's trainer and core first on the path
            paths = [str(tree / "trainer_image"), str(tree / "core"), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        runner = "elmtrain" if tool == "before" else tool
        command = [
            sys.executable,
            "-m",
            "bench.train",
            "--worker",
            runner,
            "--precision",
            precision,
        ]
        # The worker's own output, read back only if it dies; closed in ``close``.
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [*command, *(["--quick"] if quick else [])],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def run(self) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"worker exited {self.process.wait()}:\n{tail}")
        seconds: float = json.loads(line)["seconds"]
        return seconds

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


def measure(
    scale: dict[str, Any], precision: str, quick: bool, before: Path | None
) -> dict[str, Any]:
    import torch

    tokens = scale["steps"] * scale["batch"] * scale["seq_len"]
    tools = ["elmtrain", "hf_trainer", *(["before"] if before else [])]
    workers = {t: Worker(t, quick, precision, before if t == "before" else None) for t in tools}
    seconds: dict[str, list[float]] = {tool: [] for tool in tools}
    try:
        for round_ in range(scale["rounds"] + 1):  # round 0 warms up (imports, allocator, kernels)
            shift = round_ % len(tools)  # a different tool first each round
            for tool in tools[shift:] + tools[:shift]:
                elapsed = workers[tool].run()
                if round_:
                    seconds[tool].append(elapsed)
    finally:
        for each in workers.values():
            each.close()
    row: dict[str, Any] = {"precision": precision, "tokens_per_run": tokens}
    for name, values in seconds.items():
        row[name] = {
            "tokens_per_second": tokens / statistics.median(values),
            "seconds": [round(v, 3) for v in values],
        }

    def ratios(ours: str, theirs: str) -> tuple[float, list[float]]:
        # Each round's own ratio too: the runs of a round ran back to back, so a slow spell of
        # a shared machine shows as spread here rather than shifting the medians apart.
        median = row[ours]["tokens_per_second"] / row[theirs]["tokens_per_second"]
        pairs = zip(seconds[theirs], seconds[ours], strict=True)
        return median, [round(t / o, 3) for t, o in pairs]

    row["ratio"], row["round_ratios"] = ratios("elmtrain", "hf_trainer")
    if before:
        row["before_ratio"], row["before_round_ratios"] = ratios("before", "hf_trainer")
        row["speedup"], row["round_speedups"] = ratios("elmtrain", "before")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak and precision == "bf16":
            for tool in tools:
                rate = row[tool]["tokens_per_second"]
                row[tool]["mfu"] = rate * flops_per_token(scale) / peak
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    tools = [t for t in ("elmtrain", "before", "hf_trainer") if t in rows[0]]
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        ax.bar(
            [x + i * width for x in range(len(rows))],
            [r[tool]["tokens_per_second"] for r in rows],
            width,
            label="elmtrain (before)" if tool == "before" else tool,
        )
    ax.set_xticks(
        [x + width * (len(tools) - 1) / 2 for x in range(len(rows))], [r["precision"] for r in rows]
    )
    ax.set_ylabel("training tokens / s")
    ax.set_title("elmtrain loop vs transformers Trainer")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--before", type=Path, help="another checkout's loop, measured alongside")
    cli.add_argument("--worker", choices=["elmtrain", "hf_trainer"], help=argparse.SUPPRESS)
    cli.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = cli.parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick, args.precision)
        return {}
    import torch

    scale = QUICK if args.quick else FULL
    precisions = ["fp32", "bf16"] if torch.cuda.is_available() else ["fp32"]
    before = args.before.resolve() if args.before else None
    rows = [measure(scale, p, args.quick, before) for p in precisions]
    results = {
        "scale": scale,
        "flops_per_token": flops_per_token(scale),
        "before": str(before) if before else None,
        "rows": rows,
    }
    path = write_results("train", results, args)
    plot(rows, plot_path("train", args))
    header = ["precision", "elmtrain tok/s", "Trainer tok/s", "ratio"]
    lines = [
        [
            r["precision"],
            r["elmtrain"]["tokens_per_second"],
            r["hf_trainer"]["tokens_per_second"],
            r["ratio"],
        ]
        for r in rows
    ]
    if before:
        header += ["before tok/s", "before ratio", "speedup"]
        for line, r in zip(lines, rows, strict=True):
            line += [r["before"]["tokens_per_second"], r["before_ratio"], r["speedup"]]
    print(table(header, lines))
    for r in rows:
        print(f"{r['precision']}: per-round ratios {r['round_ratios']}")
        if before:
            print(f"{r['precision']}: before, per-round ratios {r['before_round_ratios']}")
            print(f"{r['precision']}: per-round speedups over before {r['round_speedups']}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()

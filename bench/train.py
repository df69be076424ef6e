"""Training throughput: the ``elmtrain`` loop against transformers' ``Trainer``.

    python -m bench.train            # GPT-2 4x256, batch 16x256, 4 rounds (~7-15 min on 2 cores)
    python -m bench.train --quick    # a small model, 1 round (< 1 min)

Same model (same initial weights), same token sequences, same batch, optimizer (AdamW, weight
decay on matrices), schedule (warmup + cosine), gradient clipping and precision. The two run in
alternating rounds in this process (each goes first every other round); each round times whole
``train`` calls, start-up included, after one untimed warm-up round. On a GPU both also run in
bf16, with model FLOPs utilisation.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import parser, plot_path, table, write_results

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


def run_elmtrain(scale: dict[str, Any], sequences: Any, precision: str) -> float:
    """Seconds for ``steps`` optimizer steps of the elmtrain loop, start-up included."""
    from elmcore.storage import open_storage
    from elmtrain.run.checkpoint import Checkpointer
    from elmtrain.run.progress import ProgressReporter
    from elmtrain.run.train import train
    from elmtrain.runtime import setup_runtime

    cfg = _config(scale, precision)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        checkpointer = Checkpointer(open_storage(tmp), "bench")
        train(
            _model(scale),
            sequences,
            cfg,
            setup_runtime(cfg),
            checkpointer,
            ProgressReporter(None, "bench"),
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
    d, layers = scale["model"]["d_model"], scale["model"]["n_layers"]
    parameters = 12 * layers * d * d + scale["vocab"] * d
    return 6 * parameters + 12 * layers * d * scale["seq_len"]


def measure(scale: dict[str, Any], precision: str) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(
        0, scale["vocab"], (scale["batch"] * scale["steps"], scale["seq_len"]), generator=generator
    )
    tokens = scale["steps"] * scale["batch"] * scale["seq_len"]
    seconds: dict[str, list[float]] = {"elmtrain": [], "hf_trainer": []}
    runners = {"elmtrain": run_elmtrain, "hf_trainer": run_hf_trainer}
    for round_ in range(scale["rounds"] + 1):  # round 0 warms up (imports, allocator, kernels)
        order = list(runners) if round_ % 2 else list(reversed(runners))  # neither always first
        for name in order:
            elapsed = runners[name](scale, sequences, precision)
            if round_:
                seconds[name].append(elapsed)
    row: dict[str, Any] = {"precision": precision, "tokens_per_run": tokens}
    for name, values in seconds.items():
        row[name] = {
            "tokens_per_second": tokens / statistics.median(values),
            "seconds": [round(v, 3) for v in values],
        }
    row["ratio"] = row["elmtrain"]["tokens_per_second"] / row["hf_trainer"]["tokens_per_second"]
    # Each round's own ratio: the two ran back to back, so a slow spell of a shared machine
    # shows as spread here rather than shifting the medians apart.
    pairs = zip(seconds["hf_trainer"], seconds["elmtrain"], strict=True)
    row["round_ratios"] = [round(theirs / ours, 3) for theirs, ours in pairs]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak and precision == "bf16":
            for tool in runners:
                rate = row[tool]["tokens_per_second"]
                row[tool]["mfu"] = rate * flops_per_token(scale) / peak
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    for i, tool in enumerate(("elmtrain", "hf_trainer")):
        ax.bar(
            [x + i * 0.4 for x in range(len(rows))],
            [r[tool]["tokens_per_second"] for r in rows],
            0.4,
            label=tool,
        )
    ax.set_xticks([x + 0.2 for x in range(len(rows))], [r["precision"] for r in rows])
    ax.set_ylabel("training tokens / s")
    ax.set_title("elmtrain loop vs transformers Trainer")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    scale = QUICK if args.quick else FULL
    precisions = ["fp32", "bf16"] if torch.cuda.is_available() else ["fp32"]
    rows = [measure(scale, p) for p in precisions]
    results = {"scale": scale, "flops_per_token": flops_per_token(scale), "rows": rows}
    path = write_results("train", results, args)
    plot(rows, plot_path("train", args))
    print(
        table(
            ["precision", "elmtrain tok/s", "Trainer tok/s", "ratio"],
            [
                [
                    r["precision"],
                    r["elmtrain"]["tokens_per_second"],
                    r["hf_trainer"]["tokens_per_second"],
                    r["ratio"],
                ]
                for r in rows
            ],
        )
    )
    for r in rows:
        print(f"{r['precision']}: per-round ratios {r['round_ratios']}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()

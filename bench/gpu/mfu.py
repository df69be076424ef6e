"""Model FLOPs utilisation of the elmtrain loop on one GPU: a Llama-shaped model of about 1B
parameters in bf16, with strategy ddp and fsdp (world size 1), and optionally compiled.

    python -m bench.gpu.mfu --out mfu.json                  # ddp and fsdp rows (one GPU)
    python -m bench.gpu.mfu --rows compile --out c.json     # torch.compile'd ddp
    python -m bench.gpu.mfu --smoke                         # a tiny model on the CPU, seconds

Each row runs in a process of its own (fsdp starts a process group of one; compiled kernels
and the allocator's peak stay with their row) and calls elmtrain's real ``train()`` as a Job
does, with a checkpointer on local storage. Tokens/s are timed between two points where the
loop itself reads the loss from the device: after ``warmup`` steps (start-up, allocator and,
compiled, the compilation are behind it) and after the last step. The recording reporter asks
the loop for a record only at those two steps, so the loop syncs with the device no more often
than a Job does between its progress records.

MFU = tokens/s x training FLOPs per token / the GPU's dense bf16 peak (``PEAK_BF16``), FLOPs
per token = 6 x the weights of every matrix product (the tied output layer included) + 12 x
layers x d_model x seq_len for attention's two products (PaLM's appendix B; nanoGPT's and
torchtitan's convention, which counts the causal half that flash attention skips).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, table
from bench.train import PEAK_BF16

# Llama-shaped, about 1.07B parameters: Llama 3.2 1B's width, depth and MLP (2048, 16 layers,
# 8192) with 128-wide heads (16 of them, 8 key-value heads) and a 32,000-token vocabulary.
GPU = {
    "model": {
        "family": "llama",
        "d_model": 2048,
        "n_layers": 16,
        "n_heads": 16,
        "n_kv_heads": 8,
        "ffn_multiplier": 4.0,
        "context_length": 2048,
        "tie_embeddings": True,
    },
    "vocab": 32000,
    "batch": 8,
    "seq_len": 2048,
    "warmup": 4,
    "steps": 16,
    "precision": "bf16",
}
SMOKE = {
    "model": {
        "family": "llama",
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_multiplier": 4.0,
        "context_length": 64,
        "tie_embeddings": True,
    },
    "vocab": 512,
    "batch": 4,
    "seq_len": 64,
    "warmup": 1,
    "steps": 3,
    "precision": "auto",
}
ROWS: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "compile": {"strategy": "ddp", "compile": True},
}


def matmul_weights(model: Any) -> int:
    """Weights that take part in a matrix product per token: every ``nn.Linear``'s, once
    (the tied output layer's is the embedding's, counted here as the output layer)."""
    from torch import nn

    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            seen[id(module.weight)] = module.weight.numel()
    return sum(seen.values())


def flops_per_token(model: Any, scale: dict[str, Any]) -> float:
    layers, d = int(scale["model"]["n_layers"]), int(scale["model"]["d_model"])
    return float(6 * matmul_weights(model) + 12 * layers * d * int(scale["seq_len"]))


class _Clock:
    """A progress reporter that writes nothing: the loop builds a record (reading the loss
    from the device) after ``warmup`` steps and after the last, and this notes the time."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self._calls = warmup, 0
        self.marks: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def due(self, force: bool = False) -> bool:
        self._calls += 1
        return force or self._calls == self.warmup

    def report(self, progress: Any, force: bool = False) -> None:
        self.marks[int(progress.step)] = time.perf_counter()
        self.losses[int(progress.step)] = float(progress.loss)

    def in_background(self) -> Any:
        from contextlib import nullcontext

        return nullcontext()


def run_row(name: str, scale: dict[str, Any]) -> dict[str, Any]:
    """One row in this process: build the model on the device, train, time, measure."""
    import torch

    from elmcore.storage import open_storage
    from elmtrain.config import ModelConfig, TrainingConfig
    from elmtrain.model.families import build_model
    from elmtrain.run.checkpoint import Checkpointer
    from elmtrain.run.train import train
    from elmtrain.runtime import setup_runtime

    cfg = TrainingConfig(
        steps=scale["steps"],
        batch_size=scale["batch"],
        seq_len=scale["seq_len"],
        warmup_steps=2,
        checkpoint_interval=10**6,
        precision=scale["precision"],
        **ROWS[name],
    )
    runtime = setup_runtime(cfg)
    cuda = runtime.device.type == "cuda"
    config = ModelConfig(**scale["model"])
    # Built on the device (initialising 1B parameters on the CPU takes longer than training).
    with torch.device(runtime.device):
        model = build_model(config, scale["vocab"], eos_id=0, seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    per_token = flops_per_token(model, scale)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(
        0, scale["vocab"], (scale["batch"] * scale["steps"], scale["seq_len"]), generator=generator
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = _Clock(scale["warmup"])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        outcome = train(
            model,
            sequences,
            cfg,
            runtime,
            Checkpointer(open_storage(tmp), "bench"),
            clock,  # type: ignore[arg-type]  # the reporter's interface, writing nothing
        )
        total = time.perf_counter() - started
    warm, last = scale["warmup"], scale["steps"]
    timed_steps = last - warm
    tokens = timed_steps * scale["batch"] * scale["seq_len"]
    seconds = clock.marks[last] - clock.marks[warm]
    rate = tokens / seconds
    row: dict[str, Any] = {
        "row": name,
        "strategy": ROWS[name]["strategy"],
        "compile": bool(ROWS[name].get("compile", False)),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "parameters": parameters,
        "matmul_weights": matmul_weights(model),
        "flops_per_token": per_token,
        "timed_steps": timed_steps,
        "timed_tokens": tokens,
        "timed_seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / timed_steps, 4),
        "tokens_per_second": round(rate, 1),
        "train_seconds_all_steps": round(total, 2),
        "loss_first_mark": clock.losses[warm],
        "loss_last": outcome.final_loss,
        "autocast": str(runtime.autocast_dtype),
    }
    if cuda:
        name_ = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name_), None)
        row["peak_bf16_flops"] = peak
        row["achieved_tflops"] = round(rate * per_token / 1e12, 1)
        row["mfu"] = round(rate * per_token / peak, 4) if peak else None
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return row


def _child(name: str, smoke: bool, log: Path, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    command = [sys.executable, "-m", "bench.gpu.mfu", "--row", name]
    with log.open("ab") as sink:
        sink.write(f"\n=== row {name} ===\n".encode())
        sink.flush()
        try:
            done = subprocess.run(
                [*command, *(["--smoke"] if smoke else [])],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=sink,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"row": name, "error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"row": name, "error": f"exited {done.returncode}; see {log.name}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--smoke", action="store_true", help="a tiny model (on the CPU: seconds)")
    cli.add_argument("--rows", default="ddp,fsdp", help=f"comma-separated, of {', '.join(ROWS)}")
    cli.add_argument("--out", type=Path, help="results JSON (default: print only)")
    cli.add_argument("--log", type=Path, help="the rows' own output (default: beside --out)")
    cli.add_argument("--timeout", type=float, default=240, help="seconds per row")
    cli.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    args = cli.parse_args(argv)
    scale = SMOKE if args.smoke else GPU
    if args.row:  # a child: one JSON line on stdout, everything else on stderr
        results = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        results.write(json.dumps(run_row(args.row, scale)) + "\n")
        results.flush()
        return {}
    names = [n for n in args.rows.split(",") if n]
    for n in names:
        if n not in ROWS:
            cli.error(f"unknown row {n!r}")
    default_log = Path(tempfile.gettempdir()) / "bench-gpu-mfu.log"
    log = args.log or (args.out.with_suffix(".log") if args.out else default_log)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    rows = []
    for n in names:
        row = _child(n, args.smoke, log, args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    import transformers

    versions = {"transformers": transformers.__version__}
    results_: dict[str, Any] = {"machine": machine(), **versions, "scale": scale, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results_, indent=2) + "\n")
    print(
        table(
            ["row", "tokens/s", "MFU", "TFLOP/s", "max allocated GiB", "s/step"],
            [
                [
                    r["row"],
                    r.get("tokens_per_second", r.get("error", "")),
                    r.get("mfu", ""),
                    r.get("achieved_tflops", ""),
                    r.get("max_memory_allocated_gib", ""),
                    r.get("seconds_per_step", ""),
                ]
                for r in rows
            ],
        )
    )
    return results_


if __name__ == "__main__":
    main()

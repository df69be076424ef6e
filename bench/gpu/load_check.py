"""Pretrained load, bf16 training, DCP checkpoint and resume, streamed export, on one device
(issue 27 points 2-4 where a GPU is: NCCL, bf16, a ~100M Llama).

    python -m bench.gpu.load_check --device cuda --out load_check.json   # one GPU, NCCL
    python -m bench.gpu.load_check --device cpu                          # a small model, gloo

1. A random Llama saved by transformers in bf16, sharded safetensors (several files).
2. The real CLI, ``elmtrain-torchrun --standalone --nproc-per-node=1 -m elmtrain seed
   --pretrained ... --training '{"strategy": "fsdp", ...}'``, killed (SIGKILL) once its first
   DCP checkpoint is committed, then run again: it must log ``checkpoint.resumed`` and commit
   the seed (the streamed export).
3. In a torchrun worker of its own (``--phase trained``): the same folder loaded into fsdp
   shards, a few AdamW steps through elmtrain's loss engine (bf16 on a GPU), exported by
   ``run/export.py``, read back by ``AutoModelForCausalLM``: every weight equal to the trained
   model's (gathered), logits in fp32 equal within ``FP32_TOLERANCE``, and the trained sharded
   model's own (bf16 on a GPU) logits within ``LOW_TOLERANCE`` of the export's under autocast.

One JSON line of results on stdout; exit 1 on any failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FP32_TOLERANCE = 1e-4  # max |logit difference| / max(1, max |logit|), same weights, fp32
LOW_TOLERANCE = 0.05  # the same in bf16 (fsdp's bf16 gather against autocast), 8 bits of mantissa
SIZES: dict[str, dict[str, Any]] = {  # d, layers, heads, vocab, shard size; training
    "cuda": {"d": 640, "layers": 12, "heads": 10, "vocab": 32000, "shard": "60MB",
             "steps": 40, "interval": 10, "batch": 8, "seq_len": 128},
    "cpu": {"d": 128, "layers": 2, "heads": 4, "vocab": 2048, "shard": "500KB",
            "steps": 12, "interval": 4, "batch": 2, "seq_len": 64},
}  # fmt: skip


def torchrun() -> list[str]:
    found = Path(sys.executable).parent / "elmtrain-torchrun"
    if found.exists():
        return [str(found)]
    return [sys.executable, "-m", "elmtrain.run.launch"]  # what the console script runs


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, deepest last, from /proc (no psutil on a bare image)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue += children.get(child, [])
    return found


def write_folder(size: dict[str, Any], out: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    d = int(size["d"])
    config = LlamaConfig(
        vocab_size=size["vocab"], hidden_size=d, intermediate_size=int(d * 8 / 3),
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"], max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=size["shard"])
    return sum(p.numel() for p in model.parameters())


def forest_with_tokens(work: Path, env: dict[str, str]) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests.textgen import domain_text

    text = work / "text.txt"
    text.write_text("".join(domain_text(d, 200, seed=0) for d in ("cooking", "sailing")))
    forest = work / "forest"
    elmtrain = [sys.executable, "-m", "elmtrain", "--log-level", "warning"]
    for args in (
        ["tokenizer", "--forest", str(forest), "--data", str(text), "--vocab-size", "320",
         "--merge"],
        ["prepare", "--forest", str(forest), "--data", str(text)],
    ):  # fmt: skip
        subprocess.run([*elmtrain, *args], check=True, cwd=ROOT, env=env)
    return forest, text


def seed_with_resume(
    forest: Path, text: Path, folder: Path, size: dict[str, Any], device: str, env: dict[str, str]
) -> dict[str, Any]:
    training = {
        "steps": size["steps"], "batch_size": size["batch"], "seq_len": size["seq_len"],
        "warmup_steps": 0, "checkpoint_interval": size["interval"], "eval_batches": 1,
        "strategy": "fsdp", "precision": "bf16" if device == "cuda" else "auto",
    }  # fmt: skip
    command = [*torchrun(), "--standalone", "--nproc-per-node=1", "-m", "elmtrain", "seed"]
    command += ["--forest", str(forest), "--pretrained", str(folder), "--data", str(text)]
    command += ["--training", json.dumps(training)]
    first = forest / "runs" / "seed" / "checkpoints" / f"step-{size['interval']:08d}"
    started = time.perf_counter()
    with (forest.parent / "first.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log,
                                   start_new_session=True)  # fmt: skip
        while process.poll() is None and not (first / "COMMITTED.json").exists():
            time.sleep(0.01)
        killed = process.poll() is None
        if killed:  # the worker (a session of its own under torchrun) first, mid-training
            for pid in [*descendants(process.pid), process.pid]:
                os.kill(pid, signal.SIGKILL)
        process.wait()
    second = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    (forest.parent / "second.log").write_text(second.stdout + second.stderr)
    return {
        "command": " ".join(command),
        "killed_after_first_checkpoint": killed,
        "resumed": '"checkpoint.resumed"' in second.stderr,
        "exit_code": second.returncode,
        "seed_committed": (forest / "seed" / "COMMITTED.json").exists()
        or any((forest / "seed").glob("*.safetensors")),
        "seconds": round(time.perf_counter() - started, 1),
    }


def trained_phase(folder: Path, out: Path, device: str, steps: int, seq_len: int) -> None:
    """In a torchrun worker: load into fsdp shards, train, export, read back, compare."""
    import torch
    from transformers import AutoModelForCausalLM

    from elmtrain.config import TrainingConfig
    from elmtrain.run.export import export_model
    from elmtrain.run.parallel import parallelize
    from elmtrain.run.sharded_load import open_model
    from elmtrain.runtime import setup_runtime, teardown_runtime

    cfg = TrainingConfig(strategy="fsdp", precision="bf16" if device == "cuda" else "auto")
    runtime = setup_runtime(cfg)
    parallel = parallelize(open_model(folder), cfg, runtime)
    model = parallel.model
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    batch = torch.randint(0, vocab, (4, seq_len), generator=generator).to(runtime.device)
    for _ in range(steps):  # one batch again and again: its loss must fall
        ids = batch
        with runtime.autocast():
            loss = parallel.engine(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    ids = torch.randint(0, vocab, (2, seq_len), generator=generator).to(runtime.device)
    with torch.no_grad(), runtime.autocast():
        sharded_logits = model(input_ids=ids).logits.float()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    export_model(parallel.unwrap(), out / "export", runtime, max_shard_bytes=total // 3)
    whole = parallel.full_model()  # the trained weights gathered, fp32, in host memory
    assert whole is not None
    loaded = AutoModelForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    ours, theirs = whole.state_dict(), loaded.state_dict()
    weight_diff = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)
    whole.to(runtime.device).eval()
    loaded.to(runtime.device)
    with torch.no_grad():
        exact = whole(input_ids=ids).logits.float()
        read = loaded(input_ids=ids).logits.float()
        with runtime.autocast():
            low = loaded(input_ids=ids).logits.float()
    scale = max(1.0, float(exact.abs().max()))
    fp32 = float((exact - read).abs().max()) / scale
    lowp = float((sharded_logits - low).abs().max()) / scale
    result = {
        "train_losses": [round(x, 4) for x in losses],
        "export_files": sorted(p.name for p in (out / "export").glob("*.safetensors")),
        "weights_max_abs_diff": weight_diff,
        "logits_fp32_rel_diff": fp32,
        "logits_low_precision_rel_diff": lowp,
        "precision": "bf16" if runtime.autocast_dtype is not None else "fp32",
        "ok": weight_diff == 0.0
        and fp32 <= FP32_TOLERANCE
        and lowp <= LOW_TOLERANCE
        and losses[-1] < losses[0],
    }
    (out / "trained.json").write_text(json.dumps(result))
    teardown_runtime(runtime)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    cli.add_argument("--out", type=Path, help="results JSON (also printed)")
    cli.add_argument("--phase", choices=["all", "trained"], default="all")
    cli.add_argument("--folder", type=Path)
    cli.add_argument("--work", type=Path)
    args = cli.parse_args(argv)
    size = SIZES[args.device]
    if args.phase == "trained":
        trained_phase(args.folder, args.work, args.device, 4, size["seq_len"])
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.device == "cpu":
        env["ELMTRAIN_DEVICE"] = "cpu"
    import torch

    results: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(json.dumps({**results, "ok": False, "error": "no CUDA device"}))
            return 1
        results["gpu"] = torch.cuda.get_device_name()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="load-check-") as tmp:
        work = Path(tmp)
        folder = work / "pretrained"
        results["parameters"] = write_folder(size, folder)
        results["folder_files"] = len(list(folder.glob("*.safetensors")))
        forest, text = forest_with_tokens(work, env)
        results["seed"] = seed_with_resume(forest, text, folder, size, args.device, env)
        command = [*torchrun(), "--standalone", "--nproc-per-node=1", "-m", "bench.gpu.load_check",
                   "--phase", "trained", "--device", args.device, "--folder", str(folder),
                   "--work", str(work)]  # fmt: skip
        phase = subprocess.run(
            command, check=False, cwd=ROOT, env=env, capture_output=True, text=True
        )
        trained = work / "trained.json"
        results["trained"] = (
            json.loads(trained.read_text())
            if trained.is_file()
            else {"ok": False, "exit_code": phase.returncode, "log": phase.stderr[-2000:]}
        )
        if not results["seed"]["resumed"] or results["seed"]["exit_code"] != 0:
            results["seed"]["log"] = (work / "second.log").read_text()[-2000:]
    seed = results["seed"]
    results["ok"] = bool(
        results["folder_files"] > 1
        and seed["killed_after_first_checkpoint"]
        and seed["resumed"]
        and seed["exit_code"] == 0
        and seed["seed_committed"]
        and results["trained"]["ok"]
    )
    results["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(results)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

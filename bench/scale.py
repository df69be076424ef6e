"""Sharded training at scale on CPU: fsdp against ddp, the largest model, pretrained loads.

    python -m bench.scale            # a 277M Llama, a ladder up to 1B, 2 CPU ranks (~15 min)
    python -m bench.scale --quick    # a ~20M Llama, the same rows (~3 min)
    python -m bench.scale --only-load  # row 3 alone (~2 min), into the results beside rows 1-2

Every row is one run of the real CLI, repeatable by hand (the results hold each command line):

    elmtrain-torchrun --standalone --nproc-per-node=2 -m elmtrain seed --forest F \\
        --model '{"family": "llama", ...}' --training '{"strategy": "fsdp", ...}' --data TEXT

on a forest that holds only a tokenizer and the text's token shards (``elmtrain tokenizer``,
``elmtrain prepare``), from a fresh copy each run (a finished seed would not rerun). While a
run lasts, the resident memory (RSS) of each process of its tree is sampled every 50 ms: the
peak of each rank, and of the tree's sum (what the node needs). A run whose tree passes the
memory cap (16 GB, or less when the machine has less available) is killed: that rung does not
fit.

1. fsdp against ddp on a ~300M Llama: each rank's peak (target: fsdp at most 0.6x ddp's) and
   tokens/s of both (3 steps of 2 x 64 tokens; the loop's own seconds, from the run's result).
2. The largest model that trains one step: a ladder of Llama sizes; for each strategy the
   largest rung whose predicted peak fits the cap is tried first (the prediction: the memory
   rule of ``elmcore.sharding.training_state_bytes``, scaled by what row 1 measured), then the
   rungs below it until one trains.
3. Loading a pretrained folder (``save_pretrained`` of a random Llama, bf16, sharded) into 2
   fsdp ranks, 0 steps: the node's peak above a run that loads a small folder, against one
   copy of the weights as the ranks train them (fp32; target at most 1.3x), and the same under
   ddp (each rank loads the whole model) for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import RESULTS, ROOT, machine, parser, plot_path, table, write_results
from elmcore import layout
from elmcore.names import SEED_RUN_ID
from elmcore.sharding import training_state_bytes

GB = 1e9
CAP_BYTES = 16 * GB  # never more than this for one run's process tree
RESERVE_BYTES = 1.5 * GB  # left to the rest of the machine when it has less available
SAMPLE_SECONDS = 0.05
BASE_BYTES = 1.0 * GB  # a rank's interpreter, torch and transformers (measured: ~1 GB)
LAUNCHER_BYTES = 0.5 * GB  # torchrun's own process
WORLD = 2
FFN = 8 / 3  # Llama's MLP width / hidden size


@dataclass(frozen=True)
class Llama:
    d_model: int
    n_layers: int
    n_heads: int
    vocab: int = 320  # the bench forest's tokenizer (a larger one needs a larger text)
    tie: bool = True

    def model_json(self) -> str:
        return json.dumps(
            {
                "family": "llama",
                "d_model": self.d_model,
                "n_layers": self.n_layers,
                "n_heads": self.n_heads,
                "ffn_multiplier": FFN,
                "context_length": 128,
                "tie_embeddings": self.tie,
            }
        )

    @property
    def name(self) -> str:
        return f"llama {self.d_model}x{self.n_layers}"

    @property
    def parameters(self) -> int:
        d, ffn = self.d_model, int(self.d_model * FFN)
        block = 4 * d * d + 3 * d * ffn + 2 * d
        return self.n_layers * block + d + self.vocab * d * (1 if self.tie else 2)


@dataclass(frozen=True)
class Scale:
    compare: Llama  # row 1
    ladder: tuple[Llama, ...]  # row 2, smallest first
    load: Llama  # row 3's folder
    load_base: Llama  # row 3's small folder (what every load costs besides the weights)
    compare_steps: int = 3
    batch: int = 2  # sequences per step, all ranks
    seq_len: int = 64


FULL = Scale(
    compare=Llama(1024, 22, 16),
    ladder=(
        Llama(1024, 22, 16),
        Llama(1024, 32, 16),
        Llama(1280, 24, 16),
        Llama(1536, 20, 16),
        Llama(1536, 24, 16),
        Llama(1536, 30, 16),
        Llama(2048, 20, 16),
    ),
    load=Llama(1024, 24, 16, vocab=32000, tie=False),
    load_base=Llama(256, 2, 4, vocab=32000, tie=False),
)
QUICK = Scale(
    compare=Llama(384, 12, 6),
    ladder=(Llama(384, 12, 6),),
    load=Llama(384, 8, 6, vocab=32000, tie=False),
    load_base=Llama(256, 2, 4, vocab=32000, tie=False),
)

# Strategy rows of the ladder: (label, training overrides).
CONFIGS: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "fsdp + activation checkpointing": {"strategy": "fsdp", "activation_checkpointing": True},
    "fsdp + checkpointing + offload": {
        "strategy": "fsdp",
        "activation_checkpointing": True,
        "offload_optimizer": True,
    },
}


@dataclass
class Run:
    label: str
    command: list[str]
    parameters: int
    ok: bool = False
    killed_at_cap: bool = False
    exit_code: int | None = None
    seconds: float = 0.0
    cap_gb: float = 0.0
    peak_rank_gb: list[float] = field(default_factory=list)
    peak_tree_gb: float = 0.0
    tokens_per_second: float | None = None
    error: str | None = None

    @property
    def peak_rank_max_gb(self) -> float:
        return max(self.peak_rank_gb, default=0.0)


def torchrun() -> str:
    found = Path(sys.executable).parent / "elmtrain-torchrun"
    return str(found) if found.exists() else "elmtrain-torchrun"


def training_json(scale: Scale, steps: int, overrides: dict[str, Any]) -> str:
    return json.dumps(
        {
            "steps": steps,
            "batch_size": scale.batch,
            "seq_len": scale.seq_len,
            "warmup_steps": 0,
            "checkpoint_interval": 1000,
            "eval_batches": 1,
            **overrides,
        }
    )


def seed_command(forest: Path, model: str, training: str, data: Path | None) -> list[str]:
    command = [torchrun(), "--standalone", f"--nproc-per-node={WORLD}", "-m", "elmtrain"]
    command += ["seed", "--forest", str(forest), "--training", training]
    if model.startswith("/"):  # a pretrained folder
        command += ["--pretrained", model]
    else:
        command += ["--model", model]
    if data is not None:
        command += ["--data", str(data)]
    return command


def shown(command: list[str], work: Path) -> str:
    """The command line as docs/benchmarks.md shows it: the bench's work folder as $W."""
    text = shlex.join(["elmtrain-torchrun", *command[1:]])
    return text.replace(str(work), "$W")


def cap_now() -> float:
    return min(CAP_BYTES, float(psutil.virtual_memory().available) - RESERVE_BYTES)


def measure(run: Run, work: Path, env: dict[str, str]) -> Run:
    """Run ``run.command`` with its tree's memory sampled; killed if the tree passes the cap."""
    cap = cap_now()
    run.cap_gb = cap / GB
    log = work / "last-run.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            run.command, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
        root = psutil.Process(process.pid)
        peaks: dict[int, int] = {}
        tree_peak = 0
        while process.poll() is None:
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total = 0
            for each in [root, *children]:
                try:
                    rss = int(each.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue
                total += rss
                if each.pid != root.pid:
                    peaks[each.pid] = max(peaks.get(each.pid, 0), rss)
            tree_peak = max(tree_peak, total)
            if total > cap:
                run.killed_at_cap = True
                os.killpg(process.pid, signal.SIGKILL)  # the run's own session, started above
                break
            time.sleep(SAMPLE_SECONDS)
        run.exit_code = process.wait()
    run.seconds = time.perf_counter() - started
    # The ranks: the launcher's children (torchrun's own helpers are small, so the largest two).
    ranks = sorted(peaks.values(), reverse=True)[:WORLD]
    run.peak_rank_gb = [round(r / GB, 3) for r in ranks]
    run.peak_tree_gb = round(tree_peak / GB, 3)
    run.ok = run.exit_code == 0 and not run.killed_at_cap
    if not run.ok:
        tail = log.read_text(errors="replace")[-1500:]
        run.error = "killed at the memory cap" if run.killed_at_cap else tail
    return run


def fresh_forest(template: Path, work: Path, name: str) -> Path:
    forest = work / "forests" / name
    if forest.exists():
        shutil.rmtree(forest)
    shutil.copytree(template, forest)
    return forest


def result_rate(forest: Path) -> float | None:
    path = forest / layout.run_result(SEED_RUN_ID)
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())["metrics"]
    seconds = float(metrics.get("seconds") or 0)
    return float(metrics["train_tokens"]) / seconds if seconds > 0 else None


class Bench:
    def __init__(self, scale: Scale, work: Path) -> None:
        self.scale, self.work = scale, work
        self.env = {**os.environ, "ELMTRAIN_CACHE": str(work / "cache")}
        self.text = work / "text.txt"
        self.template = work / "template"
        self.runs: list[Run] = []

    def prepare(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.textgen import domain_text

        domains = ("cooking", "sailing", "finance", "poetry")
        self.text.write_text("".join(domain_text(d, 200, seed=0) for d in domains))
        forest = str(self.template)
        elmtrain = [sys.executable, "-m", "elmtrain", "--log-level", "warning"]
        for args in (
            ["tokenizer", "--forest", forest, "--data", str(self.text), "--vocab-size", "320",
             "--merge"],
            ["prepare", "--forest", forest, "--data", str(self.text)],
        ):  # fmt: skip
            subprocess.run([*elmtrain, *args], check=True, cwd=ROOT, env=self.env)

    def seed(self, label: str, model: Llama | Path, steps: int, overrides: dict[str, Any]) -> Run:
        forest = fresh_forest(self.template, self.work, "run")
        if isinstance(model, Path):
            spec, parameters, data = str(model), folder_parameters(model), None
        else:
            spec, parameters, data = model.model_json(), model.parameters, self.text
        command = seed_command(forest, spec, training_json(self.scale, steps, overrides), data)
        run = measure(Run(label, command, parameters), self.work, self.env)
        if run.ok:
            run.tokens_per_second = result_rate(forest)
        shutil.rmtree(forest, ignore_errors=True)
        shutil.rmtree(self.work / "cache", ignore_errors=True)
        self.runs.append(run)
        status = "ok" if run.ok else ("killed at cap" if run.killed_at_cap else "failed")
        print(
            f"{label}: {parameters / 1e6:.0f}M {status} in {run.seconds:.0f}s, ranks "
            f"{run.peak_rank_gb} GB, tree {run.peak_tree_gb:.2f} GB (cap {run.cap_gb:.1f})",
            flush=True,
        )
        return run

    # ---- row 1 ----
    def compare(self) -> dict[str, Any]:
        model = self.scale.compare
        rows = {
            s: self.seed(f"{s} {model.name}", model, self.scale.compare_steps, {"strategy": s})
            for s in ("ddp", "fsdp")
        }
        ddp, fsdp = rows["ddp"], rows["fsdp"]
        ratio = fsdp.peak_rank_max_gb / ddp.peak_rank_max_gb if ddp.ok and fsdp.ok else None
        return {
            "model": asdict(model),
            "parameters": model.parameters,
            "ddp": asdict(ddp),
            "fsdp": asdict(fsdp),
            "peak_rank_ratio": ratio,
            "target": 0.6,
            "target_met": ratio is not None and ratio <= 0.6,
            "rule_gb_per_rank": {
                s: training_state_bytes(model.parameters, s, WORLD) / GB for s in ("ddp", "fsdp")
            },
        }

    # ---- row 2 ----
    def largest(self, measured: dict[str, Run]) -> dict[str, Any]:
        reference = self.scale.compare.parameters
        found: dict[str, Any] = {}
        for label, overrides in CONFIGS.items():
            strategy = overrides["strategy"]
            at_reference = measured[strategy]
            per_param = (
                (at_reference.peak_rank_max_gb * GB - BASE_BYTES) / reference
                if at_reference.ok
                else training_state_bytes(1, strategy, WORLD) + (4 if strategy == "ddp" else 0)
            )
            predicted = {
                m: LAUNCHER_BYTES + WORLD * (BASE_BYTES + per_param * m.parameters)
                for m in self.scale.ladder
            }
            cap = cap_now()
            fitting = [m for m in self.scale.ladder if predicted[m] <= cap] or [
                self.scale.ladder[0]
            ]
            tried: list[dict[str, Any]] = []
            best: Llama | None = None
            for model in reversed(fitting):
                if model == self.scale.compare and label in ("ddp", "fsdp") and at_reference.ok:
                    run = at_reference  # row 1 trained it (3 steps) already
                else:
                    run = self.seed(f"{label} {model.name}", model, 1, overrides)
                tried.append({"model": model.name, **asdict(run)})
                if run.ok:
                    best = model
                    break
            above = [m for m in self.scale.ladder if best is None or m.parameters > best.parameters]
            found[label] = {
                "largest": best.name if best else None,
                "parameters": best.parameters if best else 0,
                "bytes_per_parameter_per_rank": per_param,
                "tried": tried,
                "next_rung": (
                    {"model": above[0].name, "parameters": above[0].parameters,
                     "predicted_tree_gb": predicted[above[0]] / GB, "tried": False}
                    if above and not any(t["model"] == above[0].name for t in tried)
                    else None
                ),
            }  # fmt: skip
        return found

    # ---- row 3 ----
    def load(self) -> dict[str, Any]:
        big = self.work / "pretrained-big"
        small = self.work / "pretrained-small"
        write_folder(self.scale.load, big, self.env)
        write_folder(self.scale.load_base, small, self.env)
        runs = {
            "fsdp": self.seed("load fsdp", big, 0, {"strategy": "fsdp"}),
            "fsdp, small folder": self.seed("load fsdp small", small, 0, {"strategy": "fsdp"}),
            "ddp": self.seed("load ddp", big, 0, {"strategy": "ddp"}),
        }
        weights = folder_parameters(big) - folder_parameters(small)
        fp32_copy = 4 * weights
        folder_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
        out: dict[str, Any] = {
            "model": asdict(self.scale.load),
            "parameters": folder_parameters(big),
            "folder_gb": folder_bytes / GB,
            "one_fp32_copy_gb": 4 * folder_parameters(big) / GB,
            "runs": {k: asdict(v) for k, v in runs.items()},
            "target": 1.3,
        }
        base = runs["fsdp, small folder"]
        for strategy in ("fsdp", "ddp"):
            run = runs[strategy]
            if run.ok and base.ok:
                growth = (run.peak_tree_gb - base.peak_tree_gb) * GB
                out[f"{strategy}_ratio"] = growth / fp32_copy
        out["target_met"] = out.get("fsdp_ratio", 99.0) <= 1.3
        return out


_FOLDER = """
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
d, layers, heads, vocab, tie, out = sys.argv[1:]
ffn = int(int(d) * 8 / 3)
config = LlamaConfig(vocab_size=int(vocab), hidden_size=int(d), intermediate_size=ffn,
    num_hidden_layers=int(layers), num_attention_heads=int(heads), num_key_value_heads=int(heads),
    max_position_embeddings=128, tie_word_embeddings=tie == "1", bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out, max_shard_size="200MB")
"""


def write_folder(model: Llama, out: Path, env: dict[str, str]) -> None:
    """A random Llama saved by transformers, bf16, in shards (in a process of its own)."""
    args = [str(model.d_model), str(model.n_layers), str(model.n_heads), str(model.vocab)]
    args += ["1" if model.tie else "0", str(out)]
    subprocess.run([sys.executable, "-c", _FOLDER, *args], check=True, env=env)


def folder_parameters(folder: Path) -> int:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return int(json.loads(index.read_text())["metadata"]["total_parameters"])
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for size in entry["shape"]:
                    count *= size
                total += count
    return total


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    compare = results["compare"]
    names = ["ddp", "fsdp"]
    left.bar(names, [compare[n]["peak_rank_gb"][0] if compare[n]["peak_rank_gb"] else 0
                     for n in names], color=["tab:gray", "tab:blue"])  # fmt: skip
    left.set_ylabel("peak RSS of a rank (GB)")
    left.set_title(f"{compare['parameters'] / 1e6:.0f}M Llama, 2 CPU ranks")
    largest = results["largest"]
    labels = list(largest)
    middle.barh(labels, [largest[k]["parameters"] / 1e6 for k in labels], color="tab:green")
    middle.set_xlabel("largest model that trains one step (M parameters)")
    middle.set_title(f"2 CPU ranks, tree capped at {results['cap_gb']:.0f} GB")
    load = results["load"]
    bars = {k: load.get(f"{k}_ratio", 0) for k in ("fsdp", "ddp")}
    right.bar(list(bars), list(bars.values()), color=["tab:blue", "tab:gray"])
    right.axhline(1.3, color="red", linestyle="--", label="target 1.3x")
    right.set_ylabel("node's peak over one fp32 copy")
    right.set_title(f"loading a {load['parameters'] / 1e6:.0f}M bf16 folder")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--skip-load", action="store_true", help="leave out row 3")
    cli.add_argument(
        "--only-load",
        action="store_true",
        help="run row 3 alone; rows 1 and 2 are kept from the results file it updates",
    )
    args = cli.parse_args(argv)
    if args.only_load:
        return only_load(args)
    scale = QUICK if args.quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        bench = Bench(scale, work)
        bench.prepare()
        compare = bench.compare()
        measured = {
            s: next(r for r in bench.runs if r.label.startswith(s)) for s in ("ddp", "fsdp")
        }
        largest = bench.largest(measured)
        load = {} if args.skip_load else bench.load()
        commands = {r.label: shown(r.command, work) for r in bench.runs}
    results: dict[str, Any] = {
        "world_size": WORLD,
        "cap_gb": CAP_BYTES / GB,
        "batch": scale.batch,
        "seq_len": scale.seq_len,
        "note": "2 CPU ranks (gloo), one torch thread each; the machine was shared with a test "
        "suite run, so tokens/s are noisy; RSS includes each rank's torch libraries",
        "compare": compare,
        "largest": largest,
        "load": load,
        "commands": commands,
        "seconds": time.perf_counter() - started,
    }
    path = write_results("scale", results, args)
    if load:
        plot(results, plot_path("scale", args))
    c = compare
    print(
        table(
            ["strategy", "peak per rank (GB)", "tokens/s"],
            [[s, c[s]["peak_rank_gb"], c[s]["tokens_per_second"]] for s in ("ddp", "fsdp")],
        )
    )
    print(f"fsdp / ddp peak per rank: {c['peak_rank_ratio']} (target <= 0.6)")
    print(
        table(
            ["config", "largest", "M parameters"],
            [[k, v["largest"], v["parameters"] / 1e6] for k, v in largest.items()],
        )
    )
    if load:
        print(f"load: fsdp {load.get('fsdp_ratio')} ddp {load.get('ddp_ratio')} (target <= 1.3)")
    print(f"results: {path} ({results['seconds']:.0f} s)")
    return results


def only_load(args: argparse.Namespace) -> dict[str, Any]:
    """Row 3 alone, written into the results file beside the rows 1 and 2 it already holds
    (each row's machine and date are its own: ``load.machine``, ``load.date``)."""
    scale = QUICK if args.quick else FULL
    path = args.out or RESULTS / ("quick" if args.quick else "") / "scale.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    # Rows 1-2's machine stays at the top (write_results keeps a "machine" already there).
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        bench = Bench(scale, work)
        bench.prepare()
        load = bench.load()
        commands = {r.label: shown(r.command, work) for r in bench.runs}
    load["machine"], load["date"] = machine(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load["seconds"] = time.perf_counter() - started
    results["load"] = load
    results["commands"] = {**results.get("commands", {}), **commands}
    written = write_results("scale", results, argparse.Namespace(out=path, quick=args.quick))
    if results.get("compare") and results.get("largest"):
        plot(results, plot_path("scale", args))
    print(f"load: fsdp {load.get('fsdp_ratio')} ddp {load.get('ddp_ratio')} (target <= 1.3)")
    print(f"results: {written} ({load['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()

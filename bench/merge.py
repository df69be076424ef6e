"""Posterior-weighted parameter average: ``elmtrain average`` against mergekit's ``linear``.

    python -m bench.merge            # 4 and 8 checkpoints of a 125M GPT-2 (~10 min, 4 GB disk)
    python -m bench.merge --quick    # 4 checkpoints of a 16M-parameter GPT-2 (< 1 min)

Both tools read the same HF folders (config.json + model.safetensors) with the same weights
and write float32. Each tool runs once to warm the page cache (and elmtrain's artifact cache,
as a cluster's trainer would have it), then ``--repeats`` times, alternating; the table gives
the median wall time and the largest peak RSS of the process tree's main process (wait4).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    Measured,
    parser,
    plot_path,
    python_module,
    run_measured,
    table,
    write_results,
)

GPT2_125M: dict[str, int] = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}
GPT2_QUICK: dict[str, int] = {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 50257}


def make_checkpoints(work: Path, count: int, shape: dict[str, int]) -> list[Path]:
    """``count`` GPT-2 checkpoints with different random weights, in HF format."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folders = []
    for i in range(count):
        folder = work / "inputs" / f"expert-{i}"
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(i)
            GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(folder)
            (folder / "generation_config.json").unlink(missing_ok=True)
        folders.append(folder)
    return folders


def make_forest(work: Path, folders: list[Path]) -> Path:
    """A forest whose manifest lists the checkpoints as experts d0, d1, ... (as if trained)."""
    from elmcore import layout
    from elmcore.records import Result
    from elmcore.storage import open_storage
    from elmcore.storage.commit import commit_dir
    from elmcore.storage.manifest_store import merge_verified

    root = work / f"forest-{len(folders)}"
    shutil.rmtree(root, ignore_errors=True)
    storage = open_storage(str(root))
    for i, folder in enumerate(folders):
        key = layout.expert(f"d{i}", 1)
        sha = commit_dir(storage, folder, key)
        result = Result(
            run_id=f"d{i}", kind="expert", path=key, sha256=sha, domain=f"d{i}", version=1
        )
        merge_verified(storage, result)
    return root


def posterior_like(count: int) -> list[float]:
    """Unequal weights, as a domain posterior gives them (largest first, summing to 1)."""
    raw = [0.5**i for i in range(count)]
    return [w / sum(raw) for w in raw]


def mergekit_config(folders: list[Path], weights: list[float], path: Path) -> Path:
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"normalize": True},
        "models": [
            {"model": str(f), "parameters": {"weight": w}}
            for f, w in zip(folders, weights, strict=True)
        ],
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def max_difference(ours: Path, theirs: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    common = a.keys() & b.keys()
    if len(common) < len(a) - 1:  # mergekit may add or drop the tied lm_head
        raise RuntimeError(f"outputs differ in tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    return max(float((a[n] - b[n]).abs().max()) for n in common)


def compare(work: Path, count: int, shape: dict[str, int], repeats: int) -> dict[str, Any]:
    folders = make_checkpoints(work, count, shape)
    forest = make_forest(work, folders)
    weights = posterior_like(count)
    config = mergekit_config(folders, weights, work / f"mergekit-{count}.yaml")
    mergekit = Path(sys.executable).with_name("mergekit-yaml")
    env = {"ELMTRAIN_CACHE": str(work / "cache"), "ELMFOREST_LOG_FORMAT": "json"}
    spec = ",".join(f"d{i}={w}" for i, w in enumerate(weights))

    def ours(out: Path) -> Measured:
        return run_measured(
            python_module(
                "elmtrain", "average", "--forest", str(forest), "--weights", spec, "--out", str(out)
            ),
            env,
        )

    def theirs(out: Path) -> Measured:
        return run_measured([str(mergekit), str(config), str(out), "--no-copy-tokenizer"], env)

    runs: dict[str, list[Measured]] = {"elmtrain": [], "mergekit": []}
    for attempt in range(repeats + 1):  # attempt 0 warms the caches and is not counted
        for name, tool in (("elmtrain", ours), ("mergekit", theirs)):
            out = work / f"out-{name}-{count}"
            shutil.rmtree(out, ignore_errors=True)
            timing = tool(out)
            if attempt:
                runs[name].append(timing)
    difference = max_difference(work / f"out-elmtrain-{count}", work / f"out-mergekit-{count}")
    row: dict[str, Any] = {"checkpoints": count, "max_abs_difference": difference}
    for name, measured in runs.items():
        row[name] = {
            "seconds": statistics.median(m.seconds for m in measured),
            "peak_rss_mb": max(m.peak_rss_mb for m in measured),
            "all_seconds": [round(m.seconds, 2) for m in measured],
        }
    row["speedup"] = row["mergekit"]["seconds"] / row["elmtrain"]["seconds"]
    row["memory_ratio"] = row["elmtrain"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"]
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['checkpoints']} checkpoints" for r in rows]
    for ax, key, unit in (
        (axes[0], "seconds", "wall time (s)"),
        (axes[1], "peak_rss_mb", "peak RSS (MB)"),
    ):
        for i, tool in enumerate(("elmtrain", "mergekit")):
            ax.bar(
                [x + i * 0.4 for x in range(len(rows))],
                [r[tool][key] for r in rows],
                0.4,
                label=tool,
            )
        ax.set_xticks([x + 0.2 for x in range(len(rows))], labels)
        ax.set_ylabel(unit)
        ax.legend()
    figure.suptitle("weighted average of GPT-2 checkpoints: elmtrain average vs mergekit linear")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--repeats", type=int, default=None, help="timed runs per tool")
    cli.add_argument("--work", type=Path, help="keep checkpoints here (default: a temp folder)")
    args = cli.parse_args(argv)
    shape, counts = (GPT2_QUICK, (4,)) if args.quick else (GPT2_125M, (4, 8))
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        work = args.work or Path(tmp)
        rows = [compare(work, count, shape, repeats) for count in counts]
    results = {"shape": shape, "repeats": repeats, "rows": rows}
    path = write_results("merge", results, args)
    plot(rows, plot_path("merge", args))
    print(
        table(
            [
                "checkpoints",
                "elmtrain s",
                "mergekit s",
                "speedup",
                "elmtrain MB",
                "mergekit MB",
                "memory ratio",
                "max |diff|",
            ],
            [
                [
                    r["checkpoints"],
                    r["elmtrain"]["seconds"],
                    r["mergekit"]["seconds"],
                    r["speedup"],
                    r["elmtrain"]["peak_rss_mb"],
                    r["mergekit"]["peak_rss_mb"],
                    r["memory_ratio"],
                    r["max_abs_difference"],
                ]
                for r in rows
            ],
        )
    )
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()

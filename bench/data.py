"""Corpora bigger than memory: tokenizing into shards, and training from them.

    python -m bench.data            # 1 GB to tokenize, 5 GB to train from (~25 min, 2 cores)
    python -m bench.data --quick    # 20 MB and 40 MB (< 2 min)

Tokenization: one JSON-lines file of ``--tokenize-gb`` made by repeating the shared corpus'
training text, tokenized with the forest's tokenizer by ``elmtrain prepare`` (shards in the
forest's storage) and by what a user would pick instead, the ``datasets`` library
(``load_dataset("json")``, batched ``map`` of the same fast tokenizer with ``num_proc`` = cores,
``save_to_disk``; ``bench/data_baseline.py``), and by the trainer's path before shards
(``bench/data_before.py``, on ``--before-gb`` of the same text: it is the slow one). MB/s of
text and the peak RSS of each tool's whole process tree (its workers included), sampled every
0.1 s.

Training: ``--train-gb`` of text prepared the same way, then ``bench/data_train.py`` trains
the quickstart's model from the shards (read by range, never loaded) and from a small corpus
held in memory: peak RSS of the training process, seconds to the first step, tokens/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, plot_path, python_module, table, write_results

FULL = {"tokenize_gb": 1.0, "before_gb": 0.15, "train_gb": 5.0, "vocab": 8192, "steps": 60}
QUICK = {"tokenize_gb": 0.02, "before_gb": 0.01, "train_gb": 0.04, "vocab": 1024, "steps": 10}


def _train_files(corpus: Path) -> list[Path]:
    """Every domain's training text (the whole shared corpus, by default)."""
    return sorted(corpus.glob("*/train.txt"))


def make_corpus(corpus: Path, gigabytes: float, out: Path) -> int:
    """A JSON-lines file of at least ``gigabytes``: the training documents, over and over."""
    from elmtrain.data import iter_documents

    lines = [
        json.dumps({"text": doc}) + "\n"
        for path in _train_files(corpus)
        for doc in iter_documents([str(path)])
    ]
    block = "".join(lines).encode()
    target = int(gigabytes * 1e9)
    with out.open("wb") as handle:
        written = 0
        while written < target:
            handle.write(block)
            written += len(block)
    return written


def measured_tree(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time and the peak RSS of a command's whole process tree (psutil, every 0.1 s)."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(process.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.wait(0.1):
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                continue

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output[-3000:]!r}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 2**20, 1)}


def _forest(corpus: Path, scale: dict[str, Any], work: Path) -> Path:
    from bench.btm.recipes import elmtrain

    forest = work / "forest"
    train = [str(path) for path in _train_files(corpus)]
    elmtrain(
        "tokenizer",
        "--forest",
        str(forest),
        "--vocab-size",
        str(scale["vocab"]),
        "--data",
        *train,
        "--merge",
    )
    return forest


def _prepare(forest: Path, text: Path) -> list[str]:
    """``elmtrain prepare`` of one text file into the forest's shards, as a command line."""
    return python_module(
        "elmtrain", "--log-level", "warning", "prepare", "--forest", str(forest),
        "--data", str(text), "--run-id", "bench-prepare",
    )  # fmt: skip


def tokenization(
    forest: Path, text: Path, size: int, before: tuple[Path, int], work: Path
) -> dict[str, Any]:
    from elmtrain.forest import Forest

    opened = Forest.open(str(forest))
    tokenizer = opened.manifest().tokenizer
    assert tokenizer is not None
    tokenizer_dir = opened.fetch(tokenizer)
    cores = len(os.sched_getaffinity(0))
    ours = measured_tree(_prepare(forest, text))
    theirs = measured_tree(
        python_module(
            "bench.data_baseline",
            "--tokenizer",
            str(tokenizer_dir),
            "--data",
            str(text),
            "--out",
            str(work / "datasets"),
            "--num-proc",
            str(cores),
        )
    )
    old = measured_tree(
        python_module(
            "bench.data_before", "--tokenizer", str(tokenizer_dir), "--data", str(before[0])
        )
    )
    for row, mb in ((ours, size / 1e6), (theirs, size / 1e6), (old, before[1] / 1e6)):
        row["text_mb"] = round(mb, 1)
        row["mb_per_second"] = round(mb / row["seconds"], 2)
    return {
        "text_mb": round(size / 1e6, 1),
        "cores": cores,
        "elmtrain": ours,
        "datasets": theirs,
        "before": old,
        "ratio_vs_datasets": round(ours["mb_per_second"] / theirs["mb_per_second"], 2),
        "ratio_vs_before": round(ours["mb_per_second"] / old["mb_per_second"], 2),
    }


def training(forest: Path, text: Path, small: Path, scale: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for name, data in (("sharded corpus", text), ("small in-memory corpus", small)):
        measured = measured_tree(
            python_module(
                "bench.data_train",
                "--forest",
                str(forest),
                "--data",
                str(data),
                "--steps",
                str(scale["steps"]),
                *(["--in-memory"] if "small" in name else []),
            )
        )
        report = json.loads((forest / "bench-train.json").read_text())
        rows[name] = {**measured, **report}
    big, small_row = rows["sharded corpus"], rows["small in-memory corpus"]
    return {
        "rows": rows,
        "tokens_per_second_ratio": round(
            big["tokens_per_second"] / small_row["tokens_per_second"], 3
        ),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    tok = results["tokenization"]
    tools = {"elmtrain prepare": "elmtrain", "datasets map": "datasets", "before shards": "before"}
    speed.bar(list(tools), [tok[key]["mb_per_second"] for key in tools.values()])
    speed.set(ylabel="MB of text per second", title=f"tokenizing {tok['text_mb']:.0f} MB")
    rows = results["training"]["rows"]
    memory.bar(list(rows), [r["peak_rss_mb"] for r in rows.values()])
    memory.set(ylabel="peak RSS (MB)", title="training: peak memory")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--work", type=Path, help="keep the corpora and forest here")
    args = cli.parse_args(argv)
    scale = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        forest = _forest(args.corpus, scale, work)
        text = work / "tokenize.jsonl"
        size = make_corpus(args.corpus, scale["tokenize_gb"], text)
        before = work / "before.jsonl"
        before_size = make_corpus(args.corpus, scale["before_gb"], before)
        results: dict[str, Any] = {"scale": scale}
        results["tokenization"] = tokenization(forest, text, size, (before, before_size), work)
        text.unlink()
        before.unlink()
        big = work / "train.jsonl"
        results["train_text_gb"] = round(make_corpus(args.corpus, scale["train_gb"], big) / 1e9, 2)
        # Prepared first (as the operator's prepare Job does): memory stays flat at 5 GB too.
        results["train_prepare"] = measured_tree(_prepare(forest, big))
        small = work / "small.jsonl"
        make_corpus(args.corpus, 0.005, small)
        results["training"] = training(forest, big, small, scale)
    path = write_results("data", results, args)
    plot(results, plot_path("data", args))
    tok = results["tokenization"]
    print(
        table(
            ["tool", "MB/s", "seconds", "peak RSS MB"],
            [
                [name, tok[key]["mb_per_second"], tok[key]["seconds"], tok[key]["peak_rss_mb"]]
                for name, key in (
                    ("elmtrain prepare", "elmtrain"),
                    ("datasets map", "datasets"),
                    ("before shards", "before"),
                )
            ],
        )
    )
    print(
        table(
            ["training from", "peak RSS MB", "first step s", "tokens/s"],
            [
                [name, r["peak_rss_mb"], r["first_step_seconds"], r["tokens_per_second"]]
                for name, r in results["training"]["rows"].items()
            ],
        )
    )
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""CLI start-up: how soon ``elmtrain`` answers when it has nothing heavy to do.

    python -m bench.cli                        # 7 runs of each command (~3 min, most of it setup)
    python -m bench.cli --quick                # 3 runs of each (< 1 min)
    python -m bench.cli --before /tmp/before   # also another checkout's trainer, side by side

Each command is a fresh ``python -m elmtrain`` process, as a Job's container or a shell starts
it: ``--help`` (the whole command line), a bad command line (``prepare`` without its options,
exit 2), ``lineage --help`` (one command's part), and two reruns with nothing to do: ``prepare``
of text whose shards are committed, and ``seed`` of a seed that has finished. The target (issue
26) is under 1.5 s for each. One warm-up run, then ``--repeats``: the median and least wall
time, and the largest peak RSS (``wait4``; it shows whether torch was loaded).

``--before DIR`` runs the same commands with DIR's ``trainer_image`` and ``core`` first on the
path (a ``git worktree`` of an older commit), against the same forest.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from bench.common import ROOT, parser, plot_path, python_module, table, write_results

TINY_MODEL = '{"d_model": 48, "n_layers": 2, "n_heads": 2, "context_length": 64}'
NO_STEPS = '{"steps": 0, "seq_len": 64, "batch_size": 4}'


class Scale(TypedDict):
    repeats: int
    vocab: int
    domains: int | None  # None: every domain's training text


FULL = Scale(repeats=7, vocab=4096, domains=None)
QUICK = Scale(repeats=3, vocab=512, domains=1)
TARGET_SECONDS = 1.5


def _elmtrain(*args: str) -> list[str]:
    return python_module("elmtrain", "--log-level", "warning", *args)


def commands(forest: Path, texts: list[Path]) -> dict[str, tuple[list[str], int]]:
    """Name -> (command line, the exit code it must give)."""
    data = ["--forest", str(forest), "--data", *map(str, texts)]
    seed = ["--forest", str(forest), "--model", TINY_MODEL, "--training", NO_STEPS, "--merge"]
    return {
        "elmtrain --help": (python_module("elmtrain", "--help"), 0),
        "argument error": (python_module("elmtrain", "prepare"), 2),
        "elmtrain lineage --help": (python_module("elmtrain", "lineage", "--help"), 0),
        "prepare, shards committed": (_elmtrain("prepare", *data), 0),
        "seed, already finished": (_elmtrain("seed", *seed), 0),
    }


def make_forest(work: Path, texts: list[Path], vocab: int, env: dict[str, str]) -> Path:
    """A forest whose tokenizer, text shards and (untrained) seed are committed."""
    forest = work / "forest"
    tokenizer = _elmtrain(
        "tokenizer", "--forest", str(forest), "--data", str(texts[0]),
        "--vocab-size", str(vocab), "--merge",
    )  # fmt: skip
    named = commands(forest, texts)
    # The first prepare tokenizes and the first seed commits (0 steps): what reruns find.
    for command in (
        tokenizer,
        named["prepare, shards committed"][0],
        named["seed, already finished"][0],
    ):
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return forest


def timed(command: list[str], env: dict[str, str], expected: int) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one run; this process is small, so the child's peak
    is its own (Linux carries a parent's peak RSS across fork)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stderr.close()
    if process.returncode != expected:
        tail = errors.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{tail}")
    return seconds, usage.ru_maxrss / 1024


def measure(
    named: dict[str, tuple[list[str], int]], env: dict[str, str], source: Path | None, repeats: int
) -> dict[str, dict[str, float]]:
    if source is not None:
        paths = [str(source / "trainer_image"), str(source / "core"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    rows = {}
    for name, (command, expected) in named.items():
        timed(command, env, expected)  # warm: bytecode and page cache, as a rerun finds them
        runs = [timed(command, env, expected) for _ in range(repeats)]
        seconds = [s for s, _ in runs]
        rows[name] = {
            "median_seconds": round(statistics.median(seconds), 3),
            "min_seconds": round(min(seconds), 3),
            "peak_rss_mb": round(max(mb for _, mb in runs), 1),
        }
    return rows


def _commit(checkout: Path) -> str:
    found = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or "unknown"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = results["trees"]
    names = list(trees["this"])
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(trees)
    for i, (tree, rows) in enumerate(trees.items()):
        axis.bar(
            [x + i * width for x in range(len(names))],
            [rows[n]["median_seconds"] for n in names],
            width,
            label="this checkout" if tree == "this" else f"before ({results['before_commit']})",
        )
    axis.axhline(TARGET_SECONDS, color="grey", linestyle="--", label=f"{TARGET_SECONDS} s target")
    labels = [name.replace(", ", ",\n") for name in names]
    axis.set_xticks([x + width * (len(trees) - 1) / 2 for x in range(len(names))], labels)
    axis.set_ylabel("wall time, median (s)")
    axis.set_title("elmtrain start-up: a fresh process per command")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--before", type=Path, help="another checkout, measured the same way")
    cli.add_argument("--repeats", type=int, default=None, help="timed runs per command")
    args = cli.parse_args(argv)
    scale = QUICK if args.quick else FULL
    repeats = args.repeats or scale["repeats"]
    texts = sorted(args.corpus.glob("*/train.txt"))[: scale["domains"]]
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        env = {
            **os.environ,
            "ELMTRAIN_CACHE": str(Path(tmp) / "cache"),
            "ELMTRAIN_TERMINATION_LOG": "/nonexistent/termination-log",
        }
        named = commands(make_forest(Path(tmp), texts, scale["vocab"], env), texts)
        trees = {"this": measure(named, env, None, repeats)}
        if args.before:
            trees["before"] = measure(named, env, args.before, repeats)
    results: dict[str, Any] = {
        "repeats": repeats,
        "text_files": len(texts),
        "text_mb": round(sum(t.stat().st_size for t in texts) / 1e6, 1),
        "before": str(args.before) if args.before else None,
        "before_commit": _commit(args.before) if args.before else None,
        "target_seconds": TARGET_SECONDS,
        "trees": trees,
    }
    if args.before:
        results["speedup"] = {
            name: round(trees["before"][name]["median_seconds"] / row["median_seconds"], 1)
            for name, row in trees["this"].items()
        }
    path = write_results("cli", results, args)
    plot(results, plot_path("cli", args))
    header = ["command", "median s", "min s", "peak RSS MB"]
    rows = [[name, *row.values()] for name, row in trees["this"].items()]
    if args.before:
        header += ["before: median s", "before: peak RSS MB", "speedup"]
        for row, name in zip(rows, trees["this"], strict=True):
            before = trees["before"][name]
            row += [before["median_seconds"], before["peak_rss_mb"], results["speedup"][name]]
    print(table(header, rows))
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""What every benchmark shares: its command line, the machine, timed child processes, results."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "docs" / "img"


def parser(description: str) -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=description)
    cli.add_argument("--quick", action="store_true", help="a small run (< 2 min), to smoke-test")
    cli.add_argument("--out", type=Path, help="results JSON (default: bench/results/<name>.json)")
    cli.add_argument("--plot", type=Path, help="plot PNG (default: docs/img/bench-<name>.png)")
    return cli


def machine() -> dict[str, Any]:
    """Enough to tell two result files' machines apart."""
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    stdout: str


# A small launcher between the benchmark and the measured command. Linux carries a process's
# peak RSS across fork and exec, so a child forked straight from this (large) process would
# report at least this process's size; the launcher is small, and reports its child's peak.
_LAUNCHER = """
import os, resource, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\npeak-rss-kib={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(
    command: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> Measured:
    """Run a command to completion: its wall time and its own peak RSS (from ``wait4``)."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = completed.stderr[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{tail}")
    peak_kib = int(completed.stderr.rsplit("peak-rss-kib=", 1)[1])
    return Measured(seconds, peak_kib / 1024, completed.stdout)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def write_results(name: str, results: dict[str, Any], args: argparse.Namespace) -> Path:
    """Full runs go to bench/results/ (committed); quick ones to bench/results/quick/ (ignored)."""
    path = args.out or RESULTS / ("quick" if args.quick else "") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2) + "\n")
    return path


def plot_path(name: str, args: argparse.Namespace) -> Path:
    path = args.plot or (RESULTS / "quick" if args.quick else PLOTS) / f"bench-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, printed by each benchmark and pasted into docs/benchmarks.md."""

    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Laps:
    """Seconds per phase of a benchmark run: ``lap(name)`` ends the phase that began at the
    last lap (or at creation); ``seconds`` goes into the results."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._clock, 1)
        self._clock = now


def run_in_work(
    name: str,
    args: argparse.Namespace,
    domains: Iterable[str],
    run: Callable[[Path], dict[str, Any]],
    plot: Callable[[dict[str, Any], Path], None],
    markdown: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """A corpus benchmark's driver: every domain present in ``args.corpus``, ``run`` in
    ``args.work`` (or a temporary folder), timed; results written, plotted and printed."""
    import tempfile

    missing = [d for d in set(domains) if not (args.corpus / d).is_dir()]
    if missing:
        raise SystemExit(f"{args.corpus}: no domains {sorted(missing)} (see ../shared/corpus/)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run(work)
    results["seconds"]["total"] = round(time.monotonic() - started, 1)
    path = write_results(name, results, args)
    plot(results, plot_path(name, args))
    print(markdown(results))
    print(f"results: {path} ({results['seconds']['total']:.0f} s)")
    return results

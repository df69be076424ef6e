"""Operator scale: 1,000 ElmBranch objects against the emulator, elmforest against a minimal
Kopf operator that only creates a Job per object, and the Kopf floor (the fastest operator Kopf
allows: ``on.event`` only, Jobs posted with aiohttp; bench/floor_operator.py).

    python -m bench.operator            # 1,000 branches each (~1-5 min)
    python -m bench.operator --quick    # 100 branches each (< 1 min)

For each operator: a fresh emulator (tests/harness, no kubelet: Jobs are created, never run),
``--branches`` ElmBranch objects already stored, then the operator process starts (so the
test client's creation rate does not cap either operator). Measured: seconds from the
operator's start until every branch has its Job (throughput = branches / seconds, start-up
included), its peak RSS (VmHWM) and its API writes by kind. elmforest's forest has its
tokenizer and seed in S3 (moto), so it turns Ready at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, plot_path, table, write_results
from bench.operator_plane import PlaneCluster, elmforest_argv, writes_between

FOREST = "bulk"


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _forest_template(work: Path) -> Path:
    """A forest holding a tokenizer and an (untrained) seed, made by the real CLI."""
    from bench.btm.recipes import elmtrain

    template, text = work / "template", work / "text.txt"
    text.write_text("\n\n\n".join(f"document {i} about branch {i % 7}" for i in range(200)))
    elmtrain(
        "tokenizer",
        "--forest",
        str(template),
        "--data",
        str(text),
        "--vocab-size",
        "300",
        "--merge",
    )
    model = '{"d_model": 16, "n_layers": 1, "n_heads": 2, "context_length": 32}'
    elmtrain("seed", "--forest", str(template), "--model", model, "--steps", "0", "--merge")
    return template


def _upload(template: Path, endpoint: str, bucket: str) -> None:
    from elmcore.storage import open_storage

    storage = open_storage(f"s3://{bucket}/forests/{FOREST}", endpoint=endpoint)
    for path in sorted(template.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            storage.upload_file(str(path.relative_to(template)), path)


def _jobs(cluster: Any) -> int:
    if isinstance(cluster, PlaneCluster):
        return cluster.jobs()
    return int(cluster.call(lambda: cluster.emulator.count("batch/v1/jobs")))


def _create(cluster: Any, branches: int, branch: Callable[[int], dict[str, Any]]) -> float:
    started = time.perf_counter()
    if isinstance(cluster, PlaneCluster):
        cluster.create_many([branch(i) for i in range(branches)])
    else:
        for i in range(branches):
            cluster.create(branch(i))
    return time.perf_counter() - started


def _writes(cluster: Any, before: Any) -> dict[str, int]:
    """The operator's API writes by 'resource verb': counted by the API server itself on a
    control plane, by the emulator otherwise."""
    if isinstance(cluster, PlaneCluster):
        return writes_between(before, cluster.request_counts())
    calls = cluster.call(lambda: dict(cluster.emulator.calls))
    return {f"{r} {v}": n for (r, v), n in sorted(calls.items()) if v not in ("list", "watch")}


def _measure(
    cluster: Any, start: Callable[[], subprocess.Popen[bytes]], branches: int, timeout: float
) -> dict[str, Any]:
    """Start the operator with the branches already there; wait until each has its Job."""
    before = cluster.request_counts() if isinstance(cluster, PlaneCluster) else None
    started = time.perf_counter()
    process = start()
    deadline = started + timeout
    while _jobs(cluster) < branches:
        if time.perf_counter() > deadline or process.poll() is not None:
            raise RuntimeError(f"only {_jobs(cluster)} of {branches} Jobs after {timeout} s")
        time.sleep(0.05 if before is None else 0.25)  # a real list of 1,000 Jobs costs more
    seconds = time.perf_counter() - started
    by_kind = _writes(cluster, before)
    return {
        "seconds": seconds,
        "branches_per_second": branches / seconds,
        "peak_rss_mb": _vm_hwm_mb(process.pid),
        "api_calls": by_kind,
        "api_writes_per_branch": sum(by_kind.values()) / branches,
    }


def _cluster(work: Path, name: str, env: dict[str, str], real: bool) -> Any:
    (work / name).mkdir()
    if real:
        return PlaneCluster(work / name)
    from tests.harness.cluster import Cluster

    return Cluster(work / name, env, kubelet=False).start()


def run_elmforest(work: Path, branches: int, timeout: float, real: bool) -> dict[str, Any]:
    from tests.harness.moto import create_bucket, moto_server
    from tests.operator.conftest import branch_body, forest_body

    for key, value in (
        ("AWS_ACCESS_KEY_ID", "t"),
        ("AWS_SECRET_ACCESS_KEY", "t"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)  # moto takes any keys
    with moto_server() as endpoint:
        bucket = create_bucket(endpoint, "bench")
        _upload(_forest_template(work), endpoint, bucket)
        env = {
            "AWS_ACCESS_KEY_ID": "t",
            "AWS_SECRET_ACCESS_KEY": "t",
            "ELMFOREST_LOG_LEVEL": os.environ.get("BENCH_OPERATOR_LOG_LEVEL", "warning"),
        }
        cluster = _cluster(work, "elmforest", env, real)
        try:
            cluster.secret("s3-creds", {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"})
            cluster.create(
                forest_body(FOREST, f"s3://{bucket}", endpoint, maxConcurrentBranches=1024)
            )
            _create(
                cluster,
                branches,
                lambda i: branch_body(f"b{i:04d}", FOREST, f"d{i:04d}", f"s3://{bucket}"),
            )
            if real:
                log = work / "elmforest.log"
                env = {**os.environ, **env}
                return _measure(cluster, lambda: cluster.start(elmforest_argv(30), env, log),
                                branches, timeout)  # fmt: skip
            return _measure(cluster, lambda: cluster.start_operator(resync=30), branches, timeout)
        finally:
            cluster.stop()


def run_kopf_file(
    work: Path, name: str, branches: int, timeout: float, real: bool
) -> dict[str, Any]:
    """One of the single-file Kopf operators in bench/ (``minimal``, ``floor``)."""
    from tests.harness.cluster import NAMESPACE
    from tests.operator.conftest import branch_body

    cluster = _cluster(work, name, {}, real)
    # The same objects as elmforest's (a real API server checks them against the CRD).
    _create(cluster, branches, lambda i: branch_body(f"b{i:04d}", FOREST, f"d{i:04d}", "s3://b"))
    argv = [
        sys.executable,
        "-m",
        "kopf",
        "run",
        "--standalone",
        "--namespace",
        NAMESPACE,
        "--quiet",
        str(ROOT / "bench" / f"{name}_operator.py"),
    ]
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        if real:
            processes.append(cluster.start(argv, {"PATH": ""}, work / f"{name}.log"))
            return processes[0]
        with (work / f"{name}.log").open("wb") as log:
            env = {"KUBECONFIG": str(cluster.kubeconfig()), "PATH": ""}
            processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        return processes[0]

    try:
        return _measure(cluster, start, branches, timeout)
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
        cluster.stop()


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["elmforest", "minimal Kopf", "Kopf floor"]
    rows = [results["elmforest"], results["minimal"], results["floor"]]
    colors = ["C0", "C7", "C8"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [r["branches_per_second"] for r in rows], color=colors)
    factor = 1 if results["tier"] == "control plane" else 2  # the target, as each issue set it
    target = factor * results["minimal"]["branches_per_second"]
    left.axhline(target, color="C3", linestyle="--", label=f"target: {factor}x minimal")
    left.set_ylabel("branches with a Job per second")
    left.legend()
    right.bar(names, [r["peak_rss_mb"] for r in rows], color=colors)
    right.axhline(200, color="C3", linestyle="--", label="200 MB budget")
    right.set_ylabel("operator peak RSS (MB)")
    right.legend()
    figure.suptitle(f"{results['branches']} ElmBranch objects, {results['tier']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--branches", type=int, default=None)
    cli.add_argument(
        "--control-plane",
        action="store_true",
        help="a real kube-apiserver built from source (bench/operator_plane.py), not the emulator",
    )
    args = cli.parse_args(argv)
    real = args.control_plane
    branches = args.branches or (100 if args.quick else 1000)
    timeout = 60 + branches * 0.6
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        work = Path(tmp)
        results: dict[str, Any] = {
            "branches": branches,
            "tier": "control plane" if real else "emulator",
            "minimal": run_kopf_file(work, "minimal", branches, timeout, real),
            "floor": run_kopf_file(work, "floor", branches, timeout, real),
            "elmforest": run_elmforest(work, branches, timeout, real),
        }
    ours, theirs, floor = results["elmforest"], results["minimal"], results["floor"]
    results["throughput_ratio"] = ours["branches_per_second"] / theirs["branches_per_second"]
    # How far any Kopf operator can get past the minimal one here (see floor_operator.py).
    results["floor_ratio"] = floor["branches_per_second"] / theirs["branches_per_second"]
    name = "operator-plane" if real else "operator"
    path = write_results(name, results, args)
    plot(results, plot_path(name, args))
    print(
        table(
            ["operator", "seconds", "branches/s", "peak RSS MB", "API calls per branch"],
            [
                [
                    name,
                    r["seconds"],
                    r["branches_per_second"],
                    r["peak_rss_mb"],
                    r["api_writes_per_branch"],
                ]
                for name, r in (
                    ("elmforest", ours),
                    ("minimal Kopf", theirs),
                    ("Kopf floor", floor),
                )
            ],
        )
    )
    print(
        f"throughput ratio: {results['throughput_ratio']:.2f} (the Kopf floor: "
        f"{results['floor_ratio']:.2f}); results: {path}"
    )
    return results


if __name__ == "__main__":
    main()

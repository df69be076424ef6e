"""The crash-point sweep: kill the operator at each kind of side effect in turn, restart it,
check the invariants. ``python -m tests.reliability.sweep --help``; ``make reliability`` runs it
whole. The test suite runs a seeded sample (tests/reliability/test_crash_sweep.py).

A reference run counts the operator's writes per kind; every (kind, occurrence) is then a
point, killed before and after the write. ``--sample N`` picks N points, seeded, spread over
the kinds; ``--doubles N`` adds N runs killed at two points.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from tests.harness.crashes import CrashPoint, When
from tests.reliability.scenario import Outcome, Rig, ScenarioCluster, run_scenario

WHENS: tuple[When, ...] = ("before", "after")
MakeCluster = Callable[[Path, dict[str, str]], ScenarioCluster]
PLANE_TIMEOUT = 180.0  # per step of a life: real controllers and pods are slower than emulated


def every_point(effects: dict[str, int]) -> list[CrashPoint]:
    return [
        CrashPoint(label, occurrence, when)
        for label, count in sorted(effects.items())
        for occurrence in range(1, count + 1)
        for when in WHENS
    ]


def sample_points(effects: dict[str, int], n: int, seed: int) -> list[CrashPoint]:
    """``n`` points spread over the kinds of write: round-robin over kinds, random within."""
    rng = random.Random(seed)
    by_label: dict[str, list[CrashPoint]] = defaultdict(list)
    for point in every_point(effects):
        by_label[point.label].append(point)
    for points in by_label.values():
        rng.shuffle(points)
    chosen: list[CrashPoint] = []
    labels = sorted(by_label)
    rng.shuffle(labels)
    while len(chosen) < n and any(by_label.values()):
        for label in labels:
            if by_label[label] and len(chosen) < n:
                chosen.append(by_label[label].pop())
    return chosen


def double_points(effects: dict[str, int], n: int, seed: int) -> list[set[CrashPoint]]:
    """``n`` pairs of points: a second crash while recovering from the first."""
    rng = random.Random(seed + 1)
    pool = every_point(effects)
    return [set(rng.sample(pool, 2)) for _ in range(n)]


def run_all(
    rig: Rig,
    runs: Iterable[tuple[str, set[CrashPoint]]],
    parallel: int,
    progress: bool = True,
    make_cluster: MakeCluster | None = None,
) -> list[Outcome]:
    """Each run's life, ``parallel`` at a time, on the emulator or ``make_cluster``'s."""
    jobs = list(runs)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    on = {"make_cluster": make_cluster, "timeout": PLANE_TIMEOUT} if make_cluster else {}
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(run_scenario, rig, name, points, **on) for name, points in jobs]
        for future in futures:
            outcome = future.result()
            outcomes.append(outcome)
            if progress:
                mark = "ok " if outcome.ok else "BAD"
                fired = ", ".join(str(p) for p in outcome.fired) or "(not reached)"
                elapsed = time.monotonic() - started
                print(
                    f"[{len(outcomes):>3}/{len(jobs)} {elapsed:6.0f}s] {mark} {fired}"
                    f" ({outcome.seconds:.0f}s, {outcome.operator_starts} starts)",
                    file=sys.stderr,
                )
                for violation in outcome.violations:
                    print(f"      {violation}", file=sys.stderr)
    return outcomes


def summary(outcomes: list[Outcome]) -> dict[str, object]:
    """Per kind of write: points fired and passed; totals; every violation."""
    per_label: dict[str, dict[str, int]] = defaultdict(lambda: {"fired": 0, "passed": 0})
    for outcome in outcomes:
        for point in outcome.fired:
            per_label[point.label]["fired"] += 1
            per_label[point.label]["passed"] += outcome.ok
    fired = sum(len(o.fired) for o in outcomes)
    return {
        "runs": len(outcomes),
        "points_fired": fired,
        "points_not_reached": sum(len(o.points) - len(o.fired) for o in outcomes),
        "runs_failed": sum(not o.ok for o in outcomes),
        "operator_starts": sum(o.operator_starts for o in outcomes),
        "seconds_per_run": round(sum(o.seconds for o in outcomes) / max(len(outcomes), 1), 1),
        "per_label": dict(sorted(per_label.items())),
        "violations": {o.run: o.violations for o in outcomes if not o.ok},
    }


def make_templates(folder: Path) -> Path:
    """A real tokenizer and seed for the stand-in trainer, made by ``elmtrain`` (about 20 s)."""
    from tests.conftest import train_seed, train_tokenizer
    from tests.textgen import write_domains

    corpus = write_domains(folder / "corpus", ["cooking", "sailing"])
    forest = str(folder / "templates")
    files = [str(corpus / d / "train.txt") for d in ("cooking", "sailing")]
    train_tokenizer(forest, files)
    train_seed(forest, files, steps=4)
    return Path(forest)


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    root = str(Path(__file__).resolve().parents[2])
    env.update(
        PYTHONPATH=root,  # the kubelet runs ``python -m tests.harness.standin``
        OMP_NUM_THREADS="1",
        ELMFOREST_S3_MAX_ATTEMPTS="3",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.sweep", description=__doc__)
    parser.add_argument("--sample", type=int, help="run N seeded points instead of all")
    parser.add_argument("--doubles", type=int, default=0, help="also N runs with two crashes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("sweep-results.json"))
    parser.add_argument(
        "--plane",
        action="store_true",
        help="on a real control plane built from source (tests/cluster/crash_plane.py)",
    )
    args = parser.parse_args(argv)
    from tests.harness.moto import moto_server

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="elmforest-sweep-")))
        s3 = stack.enter_context(moto_server())
        make_cluster = None
        if args.plane:
            from tests.cluster.crash_plane import plane_clusters

            make_cluster = stack.enter_context(plane_clusters(work / "plane"))
        os.environ["ELMTRAIN_CACHE"] = str(work / "cache")
        rig = Rig(s3, make_templates(work), work / "runs", base_env())
        reference = run_all(rig, [("reference", set())], 1, False, make_cluster)[0]
        if not reference.ok:
            print(f"the reference run failed: {reference.violations}", file=sys.stderr)
            return 1
        points = (
            sample_points(reference.effects, args.sample, args.seed)
            if args.sample
            else every_point(reference.effects)
        )
        runs = [(f"p{i}", {p}) for i, p in enumerate(points)]
        pairs = double_points(reference.effects, args.doubles, args.seed)
        runs += [(f"d{i}", pair) for i, pair in enumerate(pairs)]
        print(f"{len(runs)} runs; reference effects {reference.effects}", file=sys.stderr)
        outcomes = run_all(rig, runs, args.parallel, make_cluster=make_cluster)
    report = {
        "seed": args.seed,
        "api_server": "kube-apiserver (tests/cluster/kube)" if args.plane else "emulator",
        "reference_effects": reference.effects,
        **summary(outcomes),
        "outcomes": [asdict(o) for o in outcomes],
    }
    args.out.write_text(json.dumps(report, indent=1, default=str))
    brief = {k: v for k, v in report.items() if k != "outcomes"}
    print(json.dumps(brief, indent=1, default=str))
    return 1 if report["runs_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

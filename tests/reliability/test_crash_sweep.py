"""A seeded sample of the crash-point sweep (the whole sweep: ``make reliability``).

Each run lives a forest's life (three branches merge, one is edited, one deleted) while the
operator is killed at three chosen side effects, and restarted each time; the invariants
(one Job per attempt, each merge exactly once, nothing lost, every checkpoint verifies, the
forest converges) are checked in ``scenario.invariants``. ``ELMFOREST_SWEEP_SEED`` picks others.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.scenario import Rig
from tests.reliability.sweep import run_all, sample_points, summary

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("ELMFOREST_SWEEP_SEED", "20261123"))
# Writes of each kind that every run makes (a reference run makes at least these many).
NOMINAL = {
    "POST jobs": 6,
    "PUT s3:manifest.json": 7,
    "PATCH elmbranches/status": 15,
    "PATCH elmbranches": 4,  # the branch finalizer: added before a first Job, removed after
    "PATCH elmforests/status": 8,
    "PATCH elmforests": 2,
    "DELETE s3:model.safetensors": 1,  # retention: Delete
}
RUNS, POINTS_PER_RUN = 2, 3


def test_crash_points_sample(rig: Rig) -> None:
    points = sample_points(NOMINAL, RUNS * POINTS_PER_RUN, SEED)
    runs = [
        (f"s{i}", set(points[i * POINTS_PER_RUN : (i + 1) * POINTS_PER_RUN])) for i in range(RUNS)
    ]
    outcomes = run_all(rig, runs, parallel=2, progress=False)
    report = summary(outcomes)
    assert report["violations"] == {}, f"seed {SEED}: {report}"
    fired = [str(p) for o in outcomes for p in o.fired]
    assert len(fired) == len(points), f"seed {SEED}: only {fired} of {points} were reached"
    print(f"seed {SEED}: {len(fired)} crash points, all invariants held: {fired}")

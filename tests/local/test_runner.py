"""The local Job controller judges real processes' exits as Kubernetes judges pods."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from elmforest.api.forest import StorageSpec, TrainerSpec
from elmforest.local.engine import Engine
from elmforest.local.resources import ManifestError, load
from elmforest.local.runner import ProcessRunner, job_record
from elmforest.local.state import JobRecord, LocalState
from elmforest.planner.jobs import JobRequest, Owner, build_job


def job_body(name: str, argv: list[str], backoff: int = 1) -> dict[str, object]:
    request = JobRequest(
        name=name,
        namespace="local",
        owner=Owner("ElmBranch", "code", "uid-1"),
        forest="demo",
        role="branch",
        run_id="branch.code.v1",
        argv=argv,
        trainer=TrainerSpec(backoff_limit=backoff),
        storage=StorageSpec(uri="file:///tmp/forest", endpoint="http://127.0.0.1:9000"),
        branch="code",
    )
    return build_job(request)


def test_job_record_reads_the_operator_job(tmp_path: Path) -> None:
    record = job_record(job_body("code-v1-a1", ["branch", "--domain", "code"]), tmp_path / "x")
    assert record.command == ["elmtrain", "branch", "--domain", "code"]
    assert record.owner == "ElmBranch/code" and record.run_id == "branch.code.v1"
    assert record.role == "branch" and record.backoff_limit == 1
    assert record.fail_exit_codes == [2, 65]
    assert record.env["ELMFOREST_S3_ENDPOINT"] == "http://127.0.0.1:9000"
    assert "ELMTRAIN_CACHE" not in record.env  # a container path; the runner sets its own


def python_job(name: str, code: str, backoff: int = 1) -> JobRecord:
    return JobRecord(
        name=name,
        owner="ElmBranch/x",
        run_id="r",
        command=[sys.executable, "-c", code],
        fail_exit_codes=[2, 65],
        backoff_limit=backoff,
        log="",
    )


def run_to_end(runner: ProcessRunner, state: LocalState, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(j.phase in ("Pending", "Running") for j in state.jobs.values()):
        runner.not_before.clear()  # skip the retry backoff
        runner.sync(state)
        assert time.monotonic() < deadline, state.jobs
        time.sleep(0.05)


def test_exit_codes_are_judged_like_a_job_controller(tmp_path: Path) -> None:
    runner = ProcessRunner(logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=4)
    termination = (
        "import os, sys; open(os.environ['ELMTRAIN_TERMINATION_LOG'], 'w')"
        ".write('elmtrain branch: error: no such data'); sys.exit(65)"
    )
    state = LocalState()
    for record in (
        python_job("ok", "print('hello')"),
        python_job("bad-input", termination),
        python_job("crashes", "raise SystemExit(1)", backoff=2),
        python_job("threads", "import os, sys; sys.exit(int(os.environ['OMP_NUM_THREADS']))"),
    ):
        record.log = str(tmp_path / "logs" / f"{record.name}.log")
        state.jobs[record.name] = record
    run_to_end(runner, state)
    jobs = state.jobs
    assert jobs["ok"].phase == "Succeeded"
    assert "hello" in Path(jobs["ok"].log).read_text()
    assert (jobs["bad-input"].phase, jobs["bad-input"].reason) == ("Failed", "PodFailurePolicy")
    assert jobs["bad-input"].message == "elmtrain branch: error: no such data"
    assert jobs["bad-input"].failures == 0  # bad input fails at once: no retries
    assert (jobs["crashes"].phase, jobs["crashes"].reason) == ("Failed", "BackoffLimitExceeded")
    assert jobs["crashes"].failures == 3  # the first run plus backoffLimit retries
    assert Path(jobs["crashes"].log).read_text().count(" start ") == 3
    assert runner.job_state(jobs["bad-input"]).permanent


def test_stopping_is_not_a_failure(tmp_path: Path) -> None:
    runner = ProcessRunner(logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=1)
    state = LocalState()
    sleeper = python_job("sleeper", "import time; time.sleep(60)")
    queued = python_job("queued", "pass")
    for record in (sleeper, queued):
        record.log = str(tmp_path / f"{record.name}.log")
        state.jobs[record.name] = record
    runner.sync(state)
    assert (sleeper.phase, queued.phase) == ("Running", "Pending")  # one slot
    assert runner.queued(queued) and runner.job_state(queued).phase == "Running"
    runner.stop_all(grace=5)
    assert (sleeper.phase, sleeper.failures) == ("Running", 0)
    ProcessRunner.resume(state)  # what the next `up` does first
    assert sleeper.phase == "Pending"


FOREST = """\
apiVersion: btm.elmforest.io/v1alpha1
kind: ElmForest
metadata: {{name: demo}}
spec:
  storage: {{uri: {uri}}}
  seed: {{data: [a.txt]}}
"""


def test_immutable_fields_cannot_change_between_runs(tmp_path: Path) -> None:
    path = tmp_path / "forest.yaml"
    path.write_text(FOREST.format(uri="one"))
    runner = ProcessRunner(logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=1)
    engine = Engine(LocalState(), runner, lambda r, e: None, lambda line: None)
    engine.declare(load([path]))
    path.write_text(FOREST.format(uri="one") + "  maxConcurrentBranches: 2\n")
    engine.declare(load([path]))
    assert engine.state.forests["demo"].generation == 2  # a mutable change: a new generation
    path.write_text(FOREST.format(uri="two"))
    with pytest.raises(ManifestError, match=r"forest.yaml:1: ElmForest 'demo': spec.storage.uri"):
        engine.declare(load([path]))


def test_gpus_are_slots(tmp_path: Path) -> None:
    """On a GPU machine each Job gets its own GPUs, and waits while too few are free."""
    runner = ProcessRunner(
        logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=4, gpus=["0", "1"]
    )
    state = LocalState()
    show = "import os, time; print('gpus=' + os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(1)"
    wide, narrow = python_job("wide", show), python_job("narrow", show)
    wide.env["ELMFOREST_LOCAL_GPUS"] = "2"
    for record in (wide, narrow):
        record.log = str(tmp_path / f"{record.name}.log")
        state.jobs[record.name] = record
    runner.sync(state)
    assert (wide.phase, narrow.phase) == ("Running", "Pending")  # both GPUs are taken
    run_to_end(runner, state)
    assert "gpus=0,1" in Path(wide.log).read_text()
    assert "gpus=0" in Path(narrow.log).read_text()

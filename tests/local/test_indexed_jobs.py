"""Local mode runs an Indexed Job (a parallel prepare step) as the cluster does, one index
after another, each process with its JOB_COMPLETION_INDEX: the same Job body, the same result
as one pod's."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from elmcore.names import RunId
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.forest import ElmForestSpec, StorageSpec
from elmforest.local.runner import ProcessRunner, job_record
from elmforest.local.state import JobRecord, LocalState
from elmforest.planner.jobs import Owner
from elmforest.planner.prepare import prepare_job
from elmtrain.forest import Forest
from tests.local.test_runner import run_to_end


def _prepare_body(forest: Path, data: list[str], workers: int) -> dict[str, object]:
    spec = ElmForestSpec.model_validate(
        {"storage": {"uri": forest.absolute().as_uri()}, "prepare": {"parallelism": workers}}
    )
    owner = Owner("ElmForest", "demo", "uid-1")
    return prepare_job("demo-prep", "local", owner, "demo", spec, RunId.seed_prepare(), (data, []))


def test_indexes_run_in_turn_and_a_failed_index_alone_is_retried(tmp_path: Path) -> None:
    code = (
        "import os, pathlib, sys; i = os.environ['JOB_COMPLETION_INDEX']; "
        "p = pathlib.Path(sys.argv[1]); p.open('a').write(i + ' '); "
        "sys.exit(1 if i == '1' and p.read_text().count('1') == 1 else 0)"
    )
    seen = tmp_path / "seen"
    record = JobRecord(
        name="indexed",
        owner="ElmForest/x",
        run_id="r",
        command=[sys.executable, "-c", code, str(seen)],
        fail_exit_codes=[2, 65],
        backoff_limit=1,
        completions=3,
        log=str(tmp_path / "indexed.log"),
    )
    state = LocalState(jobs={"indexed": record})
    runner = ProcessRunner(logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=4)
    runner.sync(state)
    assert runner.job_state(record).phase == "Running"
    run_to_end(runner, state)
    assert seen.read_text().split() == ["0", "1", "1", "2"]  # index 1 failed once, retried
    assert (record.phase, record.completed, record.failures) == ("Succeeded", 3, 1)


def test_a_parallel_prepare_job_runs_locally_into_one_pods_result(
    tokenizer_forest: Path, corpus: Path, tmp_path: Path
) -> None:
    one, many = tmp_path / "one", tmp_path / "many"
    shutil.copytree(tokenizer_forest, one)
    shutil.copytree(tokenizer_forest, many)
    data = [str(corpus / d) for d in ("cooking", "sailing", "poetry")]
    body = _prepare_body(many, data, 2)
    record = job_record(body, tmp_path / "logs" / "demo-prep.log")
    assert record.completions == 2 and record.command[-2:] == ["--workers", "2"]
    assert job_record(_prepare_body(many, data, 1), tmp_path / "x").completions == 1

    state = LocalState(jobs={record.name: record})
    runner = ProcessRunner(logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=1)
    run_to_end(runner, state, timeout=240)
    assert record.phase == "Succeeded", Path(record.log).read_text()[-3000:]
    assert Path(record.log).read_text().count(" start ") == 2  # one process per index

    expected = Forest.open(str(one)).token_store().prepare(data)
    combined = Forest.open(str(many)).prepared(data)
    assert combined is not None
    assert [(f.key, f.shards, f.tokens) for f in combined.files] == [
        (f.key, f.shards, f.tokens) for f in expected.files
    ]
    # What the operator asks of storage (local mode's too) before it plans training: prepared.
    adapter = ForestStorage(StorageSpec(uri=many.absolute().as_uri()))
    manifest = adapter.view().manifest
    assert manifest is not None and manifest.tokenizer is not None
    assert adapter.prepared(manifest.tokenizer.sha256, [data])

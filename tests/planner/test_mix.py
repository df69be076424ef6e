"""The forest's mix (spec.mix): one Job once every branch is settled, recorded once, remade
at the next number when the experts or the settings change; bad settings are a condition."""

from __future__ import annotations

from typing import Any

from elmcore import layout
from elmcore.manifest import ArtifactEntry, ExpertEntry, Manifest, merge_result
from elmcore.names import mix_run_id
from elmcore.records import MixRecord, Parent, Progress, Result
from elmforest.api.forest import ElmForestSpec, ElmForestStatus
from elmforest.planner.actions import CreateJob, DeleteJob, Event, MergeResult, PatchStatus, Plan
from elmforest.planner.forest import ForestInput, plan_forest
from elmforest.planner.mix import desired_mix, pending_branches
from elmforest.planner.observed import JobState, RunRecords, StorageView

IMAGE = "reg/elmtrain@sha256:" + "a" * 64


def spec(**mix: Any) -> ElmForestSpec:
    return ElmForestSpec.model_validate(
        {
            "storage": {"uri": "s3://bkt/f"},
            "trainer": {"image": IMAGE},
            "model": {"family": "llama"},
            "seed": {"data": ["s3://bkt/d/seed.txt"]},
            "mix": {"enabled": True, "steps": 5, **mix},
        }
    )


def manifest(**versions: int) -> Manifest:
    experts = {
        d: ExpertEntry(path=layout.expert(d, v), sha256=f"{v:064x}", domain=d, version=v)
        for d, v in versions.items()
    }
    entry = ArtifactEntry(path="seed", sha256="5" * 64)
    return Manifest(revision=3, tokenizer=entry, seed=entry, experts=experts)


def forest(
    s: ElmForestSpec,
    m: Manifest,
    pending: list[str] | None = None,
    jobs: dict[str, JobState] | None = None,
    records: RunRecords | None = None,
) -> Plan:
    return plan_forest(
        ForestInput(
            name="f",
            namespace="ns",
            uid="u",
            generation=1,
            spec=s,
            status=ElmForestStatus(),
            storage=StorageView(manifest=m),
            jobs=jobs or {},
            records={"mix": records} if records else {},
            pending_branches=pending or [],
        )
    )


def mix_status(plan: Plan) -> dict[str, Any]:
    status = next(a.status for a in plan.actions if isinstance(a, PatchStatus))
    mix: dict[str, Any] = status["mix"]
    return mix


def jobs_of(plan: Plan) -> list[dict[str, Any]]:
    return [a.body for a in plan.actions if isinstance(a, CreateJob)]


def finished(s: ElmForestSpec, m: Manifest) -> Result:
    step = desired_mix("f", s, m, [])
    assert step is not None
    return Result(
        run_id=step.run_id,
        kind="mix",
        path=layout.mix_model(step.number, step.key),
        sha256="e" * 64,
        parents=[
            Parent(kind="expert", domain=d, version=v, weight=1 / len(step.experts))
            for d, v in step.experts.items()
        ],
        mix=MixRecord(number=step.number, key=step.key, top_k=2, steps=5),
    )


def test_waits_for_pending_branches_then_plans_one_job() -> None:
    m = manifest(code=1, law=1)
    assert pending_branches([("a", "Merged"), ("b", "Training"), ("c", "Failed")]) == ["b"]
    waiting = forest(spec(), m, pending=["b"])
    assert not jobs_of(waiting)
    assert mix_status(waiting)["phase"] == "Waiting" and "b" in mix_status(waiting)["message"]
    plan = forest(spec(), m)
    [job] = jobs_of(plan)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--experts") + 1] == "code=1,law=1"
    assert args[args.index("--number") + 1] == "1" and "mix-forest" in args
    assert args[args.index("--steps") + 1] == "5"
    assert mix_status(plan)["phase"] == "Mixing"
    assert plan.requeue_after is not None


def test_disabled_plans_nothing() -> None:
    plan = forest(spec(enabled=False), manifest(code=1, law=1))
    assert not jobs_of(plan)
    status = next(a.status for a in plan.actions if isinstance(a, PatchStatus))
    assert "mix" not in status


def test_result_is_merged_once_then_current() -> None:
    s, m = spec(), manifest(code=1, law=1)
    result = finished(s, m)
    plan = forest(s, m, records=RunRecords(result=result))
    assert [a.result for a in plan.actions if isinstance(a, MergeResult)] == [result]
    merged = merge_result(m, result)
    after = forest(s, merged)
    assert not jobs_of(after) and not any(isinstance(a, MergeResult) for a in after.actions)
    status = mix_status(after)
    assert status["phase"] == "Ready" and status["revision"] == 1
    assert status["experts"] == {"code": 1, "law": 1}
    assert status["uri"] == f"s3://bkt/f/{result.path}" and status["finetuneSteps"] == 5


def test_a_result_of_another_key_is_not_merged() -> None:
    s, m = spec(), manifest(code=1, law=1)
    other = finished(spec(steps=9), m)
    plan = forest(s, m, records=RunRecords(result=other))
    assert not any(isinstance(a, MergeResult) for a in plan.actions)


def test_changed_experts_or_settings_make_the_next_mix() -> None:
    s, m = spec(), manifest(code=1, law=1)
    merged = merge_result(m, finished(s, m))
    newer = merged.model_copy(update={"experts": manifest(code=2, law=1).experts})
    step = desired_mix("f", s, newer, [])
    assert step is not None and step.number == 2 and step.experts == {"code": 2, "law": 1}
    assert step.run_id == mix_run_id(2, step.key)
    plan = forest(s, newer)
    assert len(jobs_of(plan)) == 1
    assert mix_status(plan)["revision"] == 1  # the old one stays until the new one lands
    resettled = desired_mix("f", spec(routerOnly=True), merged, [])
    assert resettled is not None and resettled.number == 2


def test_superseded_mix_job_is_deleted() -> None:
    s, m = spec(), manifest(code=1, law=1)
    first = desired_mix("f", s, m, [])
    assert first is not None
    moved = manifest(code=2, law=1)
    plan = forest(s, moved, jobs={first.job_name: JobState(first.job_name, "Running")})
    assert [a.name for a in plan.actions if isinstance(a, DeleteJob)] == [first.job_name]
    assert len(jobs_of(plan)) == 1


def test_top_k_above_the_experts_is_a_condition() -> None:
    plan = forest(spec(topK=3), manifest(code=1, law=1))
    assert not jobs_of(plan)
    status = next(a.status for a in plan.actions if isinstance(a, PatchStatus))
    assert status["phase"] == "Ready"  # the forest itself is fine
    [cond] = [c for c in status["conditions"] if c["type"] == "MixReady"]
    assert cond["status"] == "False" and "spec.mix.topK 3" in cond["message"]
    assert any(isinstance(a, Event) and a.reason == "MixFailed" for a in plan.actions)


def test_gpt2_forest_is_refused_naming_the_families_that_mix() -> None:
    gpt2 = spec().model_copy(update={"model": spec().model.model_copy(update={"family": "gpt2"})})
    plan = forest(gpt2, manifest(code=1, law=1))
    assert not jobs_of(plan)
    message = mix_status(plan)["message"]
    assert mix_status(plan)["phase"] == "Failed"
    assert "gpt2" in message and "llama, mistral" in message


def test_failed_job_reports_the_trainers_message() -> None:
    s, m = spec(), manifest(code=1, law=1)
    step = desired_mix("f", s, m, [])
    assert step is not None
    failed = JobState(step.job_name, "Failed", "PodFailurePolicy", "exit 65")
    why = "a gpt_neox model cannot be mixed; ... (llama, mistral)"
    progress = Progress(run_id=step.run_id, phase="failed", message=why)
    plan = forest(s, m, jobs={step.job_name: failed}, records=RunRecords(progress=progress))
    assert not jobs_of(plan)
    assert mix_status(plan)["phase"] == "Failed" and why in mix_status(plan)["message"]


def test_the_recorded_mixs_job_is_left_to_finish() -> None:
    s, m = spec(), manifest(code=1, law=1)
    step = desired_mix("f", s, m, [])
    assert step is not None
    merged = merge_result(m, finished(s, m))
    running = {step.job_name: JobState(step.job_name, "Running")}
    plan = forest(s, merged, jobs=running)  # its result is in, its pod not yet gone
    assert not any(isinstance(a, DeleteJob) for a in plan.actions)
    assert mix_status(plan)["phase"] == "Ready"

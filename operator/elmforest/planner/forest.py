"""The forest planner: tokenizer, then seed, then Ready; status mirrors the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from elmcore import layout
from elmcore.manifest import Manifest
from elmcore.names import RunId
from elmcore.records import Lineage, ServingRecord
from elmforest.api import FOREST
from elmforest.api.forest import (
    ArtifactStatus,
    ElmForestSpec,
    ElmForestStatus,
    ExpertStatus,
    ForestPhase,
    LineageStatus,
    ManifestStatus,
    ParentStatus,
)
from elmforest.planner.actions import (
    Action,
    CreateJob,
    Event,
    MergeResult,
    PatchStatus,
    Plan,
)
from elmforest.planner.conditions import MIX_READY, READY, set_condition
from elmforest.planner.jobs import JobRequest, Owner, build_job
from elmforest.planner.mix import MixInput, plan_mix
from elmforest.planner.naming import digest, forest_job_name
from elmforest.planner.observed import JobState, OwnedObject, RunRecords, StorageView
from elmforest.planner.prepare import Preparation, PrepareStep, prepare_job, progress_summary
from elmforest.planner.serving import serving_actions, serving_status
from elmforest.planner.trainer_args import seed_argv, tokenizer_argv

POLL_SECONDS = 10.0


@dataclass(frozen=True)
class ForestInput:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: ElmForestSpec | None
    status: ElmForestStatus
    storage: StorageView = field(default_factory=StorageView)
    jobs: dict[str, JobState] = field(default_factory=dict)
    records: dict[str, RunRecords] = field(default_factory=dict)  # "tokenizer" / "seed"
    branches_by_domain: dict[str, str] = field(default_factory=dict)
    require_image: bool = True  # a cluster needs an image; local mode runs processes
    preparation: Preparation | None = None  # of the seed's text; None: not observed
    serving: dict[str, OwnedObject] = field(default_factory=dict)  # by kind, as watched
    serving_records: list[ServingRecord] = field(default_factory=list)  # storage's serving/
    forbidden: str | None = None  # outside the installation's guardrails (planner/policy.py)
    pending_branches: list[str] = field(default_factory=list)  # may still merge (planner/mix.py)


def spec_problem(spec: ElmForestSpec, require_image: bool) -> str | None:
    """What makes a well-typed spec impossible to run, in one sentence."""
    if require_image and not spec.trainer.image:
        return "spec.trainer.image is required (pinned by digest; or the chart's trainer.image)"
    if not spec.tokenizer.from_ and not (spec.tokenizer.data or spec.seed.data):
        return "spec.tokenizer needs 'from' or 'data' (or spec.seed.data to train on)"
    steps = (spec.seed.training.model_dump().get("steps") if spec.seed.training else None) or 0
    if not spec.seed.data and not spec.model.model_dump().get("pretrained") and steps != 0:
        return "spec.seed.data is required unless spec.model.pretrained is given"
    return None


def artifact_uri(spec: ElmForestSpec, path: str) -> str:
    return f"{spec.storage.uri.rstrip('/')}/{path}"


def experts_status(
    spec: ElmForestSpec, manifest: Manifest, branches: dict[str, str]
) -> list[ExpertStatus]:
    return [
        ExpertStatus(
            domain=entry.domain,
            branch=branches.get(entry.domain),
            version=entry.version,
            uri=artifact_uri(spec, entry.path),
            sha256=entry.sha256,
            init_strategy=entry.init_strategy,
            parents=[ParentStatus.model_validate(p.model_dump()) for p in entry.parents],
            val_perplexity_before=entry.metrics.val_ppl_before,
            val_perplexity_after=entry.metrics.val_ppl_after,
            lineage=lineage_status(entry.lineage),
        )
        for entry in manifest.sorted_experts()
    ]


def lineage_status(lineage: Lineage | None) -> LineageStatus | None:
    if lineage is None:
        return None
    return LineageStatus(
        data_sha256=lineage.data_sha256,
        data_files=len(lineage.data),
        data_bytes=sum(f.size for f in lineage.data),
        tokenizer_sha256=lineage.tokenizer_sha256,
        seed_sha256=lineage.seed_sha256,
        image=lineage.image,
        elmtrain_version=lineage.elmtrain_version,
    )


def _finish(plan: Plan, old: ElmForestStatus, new: ElmForestStatus) -> Plan:
    if new.phase != old.phase:
        kind: Literal["Normal", "Warning"] = "Warning" if new.phase == "Failed" else "Normal"
        plan.actions.insert(0, Event(kind, new.phase, new.message or f"forest is {new.phase}"))
    if new.to_api() != old.to_api():
        plan.add(PatchStatus(new.to_api()))
    return plan


def _failed(inp: ForestInput, status: ElmForestStatus, reason: str, message: str) -> Plan:
    status.phase, status.message = "Failed", message
    status.conditions = set_condition(
        status.conditions, READY, "False", reason, message, inp.generation
    )
    return _finish(Plan(requeue_after=POLL_SECONDS * 3), inp.status, status)


def plan_forest(inp: ForestInput, spec_error: str | None = None) -> Plan:
    status = inp.status.model_copy(deep=True)
    status.observed_generation = inp.generation
    if inp.spec is None or spec_error:
        return _failed(inp, status, "InvalidSpec", spec_error or "the spec is invalid")
    spec = inp.spec
    if inp.forbidden:  # first: what the installation refuses is refused, whatever else
        return _failed(inp, status, "Forbidden", inp.forbidden)
    problem = spec_problem(spec, inp.require_image)
    if problem:
        return _failed(inp, status, "InvalidSpec", problem)
    if inp.storage.error or inp.storage.manifest is None:
        message = inp.storage.error or "storage is not readable"
        return _failed(inp, status, inp.storage.error_reason, message)
    manifest = inp.storage.manifest
    status.manifest = ManifestStatus(
        uri=artifact_uri(spec, layout.MANIFEST), revision=manifest.revision
    )
    if manifest.tokenizer is not None:
        status.tokenizer = ArtifactStatus(
            uri=artifact_uri(spec, manifest.tokenizer.path), sha256=manifest.tokenizer.sha256
        )
    if manifest.seed is not None:
        status.seed = ArtifactStatus(
            uri=artifact_uri(spec, manifest.seed.path), sha256=manifest.seed.sha256
        )
    status.experts = experts_status(spec, manifest, inp.branches_by_domain)
    status.expert_count = len(status.experts)
    for role, done in (("tokenizer", manifest.tokenizer), ("seed", manifest.seed)):
        if done is None:
            return _build_step(inp, spec, status, role)
    status.phase, status.message = "Ready", f"{status.expert_count} experts merged"
    status.conditions = set_condition(
        status.conditions,
        READY,
        "True",
        "SeedReady",
        "tokenizer and seed are merged",
        inp.generation,
    )
    # Served once there is a seed to serve; the servers follow the manifest from then on.
    # Their objects come after the status, so a refused write never hides the forest's state.
    status.serving = serving_status(inp.name, inp.namespace, spec, inp.serving, inp.serving_records)
    mixing = _mix(inp, spec, manifest, status)
    owner = Owner(FOREST.kind, inp.name, inp.uid)
    busy = status.mix is not None and status.mix.phase == "Mixing"
    plan = _finish(Plan(requeue_after=POLL_SECONDS if busy else None), inp.status, status)
    said = inp.status.serving.message if inp.status.serving else ""
    if status.serving is not None and status.serving.message not in ("", said):
        plan.add(Event("Warning", "ServingDegraded", status.serving.message))
    said = inp.status.mix.message if inp.status.mix else ""
    if status.mix is not None and status.mix.phase == "Failed" and status.mix.message != said:
        plan.add(Event("Warning", "MixFailed", status.mix.message))
    plan.add(*mixing)
    return plan.add(*serving_actions(inp.name, inp.namespace, owner, spec, inp.serving))


def _mix(
    inp: ForestInput, spec: ElmForestSpec, manifest: Manifest, status: ElmForestStatus
) -> list[Action]:
    """The mix's status and condition (spec.mix; planner/mix.py), and its actions."""
    mix_input = MixInput(
        inp.name, inp.namespace, inp.uid, spec, manifest, inp.pending_branches, inp.jobs,
        inp.records.get("mix", RunRecords()),
    )  # fmt: skip
    status.mix, actions = plan_mix(mix_input)
    if status.mix is None:
        status.conditions = [c for c in status.conditions if c.type != MIX_READY]
        return actions
    ready: Literal["True", "False"] = "True" if status.mix.phase == "Ready" else "False"
    reason = {"Ready": "Mixed", "Failed": "MixFailed"}.get(status.mix.phase, status.mix.phase)
    status.conditions = set_condition(
        status.conditions, MIX_READY, ready, reason, status.mix.message, inp.generation
    )
    return actions


def seed_prepare_datasets(spec: ElmForestSpec) -> tuple[list[str], list[str]]:
    """The location lists (training, validation) the seed's prepare step turns into shards."""
    return spec.seed.data, spec.seed.val_data


def seed_prepare_job_name(forest: str, spec: ElmForestSpec) -> str:
    return forest_job_name(forest, "prepare", digest(list(seed_prepare_datasets(spec))))


def seed_prepare(forest: str, spec: ElmForestSpec, manifest: Manifest | None) -> PrepareStep | None:
    """The seed's prepare step while the seed is still to be trained; None once it is (or
    while the manifest is unread)."""
    if manifest is None or manifest.seed is not None:
        return None
    return PrepareStep(
        seed_prepare_job_name(forest, spec), RunId.seed_prepare(), seed_prepare_datasets(spec)
    )


def _prepare_seed(inp: ForestInput, spec: ElmForestSpec, status: ElmForestStatus) -> Plan | None:
    """Tokenize the seed's text in its own CPU Job first; None once done (or not needed)."""
    preparation = inp.preparation
    if preparation is None or not preparation.needed or not spec.prepare.enabled:
        return None
    if not spec.seed.data or inp.records.get("seed", RunRecords()).result is not None:
        return None
    name = seed_prepare_job_name(inp.name, spec)
    job = preparation.job
    plan = Plan(requeue_after=POLL_SECONDS)
    if job is not None and job.phase == "Succeeded":
        return None
    if job is not None and job.phase == "Failed":
        progress = preparation.records.progress
        why = progress.message if progress and progress.phase == "failed" else job.message
        reason = "BadInput" if job.permanent else "PrepareFailed"
        return _failed(inp, status, reason, f"{name}: {why}")
    if job is None:
        owner = Owner(FOREST.kind, inp.name, inp.uid)
        data = seed_prepare_datasets(spec)
        body = prepare_job(name, inp.namespace, owner, inp.name, spec, RunId.seed_prepare(), data)
        plan.add(CreateJob(body))
    summary = progress_summary(preparation.records)
    status.phase = "Preparing"
    status.message = f"seed text: Job {name}" + (f" ({summary})" if summary else "")
    status.conditions = set_condition(
        status.conditions, READY, "False", "Preparing", status.message, inp.generation
    )
    return _finish(plan, inp.status, status)


def _build_step(inp: ForestInput, spec: ElmForestSpec, status: ElmForestStatus, role: str) -> Plan:
    """Produce the tokenizer or the seed: merge a finished result, else run (or watch) its Job."""
    phase: ForestPhase = "Tokenizing" if role == "tokenizer" else "Seeding"
    argv = tokenizer_argv(spec) if role == "tokenizer" else seed_argv(spec)
    name = forest_job_name(inp.name, role, digest(argv))
    if role == "seed" and name not in inp.jobs:  # a running seed Job tokenizes for itself
        preparing = _prepare_seed(inp, spec, status)
        if preparing is not None:
            return preparing
    records = inp.records.get(role, RunRecords())
    plan = Plan(requeue_after=POLL_SECONDS)
    if records.result is not None:
        # Merging is idempotent (CAS, keyed by sha256): a repeat after a crash changes nothing.
        status.phase, status.message = phase, f"merging the {role}"
        return _finish(plan.add(MergeResult(records.result)), inp.status, status)
    job = inp.jobs.get(name)
    if job is not None and job.phase == "Failed":
        return _failed(inp, status, f"{role.capitalize()}Failed", f"{name}: {job.message}")
    if job is None:
        request = JobRequest(
            name=name,
            namespace=inp.namespace,
            owner=Owner(FOREST.kind, inp.name, inp.uid),
            forest=inp.name,
            role=role,
            run_id=role,
            argv=argv,
            trainer=spec.trainer,
            storage=spec.storage,
        )
        plan.add(CreateJob(build_job(request)))
    status.phase = phase
    status.message = _progress_message(role, name, records)
    status.conditions = set_condition(
        status.conditions, READY, "False", phase, status.message, inp.generation
    )
    return _finish(plan, inp.status, status)


def _progress_message(role: str, job: str, records: RunRecords) -> str:
    progress = records.progress
    if progress is None or not progress.total_steps:
        return f"{role}: Job {job}"
    return f"{role}: step {progress.step}/{progress.total_steps} (Job {job})"

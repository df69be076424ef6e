"""The forest's mix (``spec.mix``, Branch-Train-MiX): once every branch is settled, one Job
mixes the merged experts into a Mixtral model and finetunes it (``elmtrain mix-forest``); its
result is recorded in the manifest. Pure: what to do from what was observed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from elmcore.manifest import Manifest, MixEntry
from elmcore.names import mix_run_id
from elmforest.api import FOREST
from elmforest.api.forest import ElmForestSpec, MixStatus
from elmforest.planner.actions import Action, CreateJob, DeleteJob, MergeResult
from elmforest.planner.jobs import JobRequest, Owner, build_job
from elmforest.planner.naming import digest, forest_job_name
from elmforest.planner.observed import JobState, RunRecords
from elmforest.planner.trainer_args import _compact, effective_training, forest_args

MIXABLE = ("llama", "mistral")  # what `elmtrain mix` accepts (trainer's mix/plan.py)
SETTLED_BRANCH = frozenset({"Merged", "Failed", "Suspended"})  # nothing more will merge
ROLE = "mix"


@dataclass(frozen=True)
class MixStep:
    """The mix the forest should have and does not: its number, key, run and Job."""

    number: int
    key: str
    experts: dict[str, int]  # domain -> version to mix
    run_id: str
    job_name: str
    argv: list[str]


def pending_branches(phases: Iterable[tuple[str, str]]) -> list[str]:
    """The branches (name, phase) that may still merge an expert: the mix waits for them."""
    return sorted(name for name, phase in phases if phase not in SETTLED_BRANCH)


def mix_argv(spec: ElmForestSpec, number: int, key: str, experts: dict[str, int]) -> list[str]:
    mix = spec.mix
    pairs = ",".join(f"{d}={v}" for d, v in sorted(experts.items()))
    argv = ["mix-forest", *forest_args(spec), "--number", str(number), "--key", key]
    argv += ["--experts", pairs, "--top-k", str(mix.top_k)]
    argv += ["--router", mix.router, "--average", mix.average]
    if mix.router_only:
        argv.append("--router-only")
    if mix.data:
        argv += ["--data", *mix.data]
    if mix.val_data:
        argv += ["--val-data", *mix.val_data]
    training = effective_training(spec.branch_defaults, None)
    return [*argv, "--training", _compact(training), "--steps", str(mix.steps)]


def mix_key(spec: ElmForestSpec, manifest: Manifest) -> str:
    """One digest of the exact experts (domain, version, bytes) and every setting of the mix:
    the recorded mix is current iff its key is this."""
    experts = {e.domain: [e.version, e.sha256] for e in manifest.sorted_experts()}
    settings = spec.mix.model_dump(mode="json", exclude={"enabled"})
    training = effective_training(spec.branch_defaults, None).model_dump(mode="json")
    text = json.dumps([experts, settings, training], sort_keys=True)
    return digest(text, 32)


def desired_mix(
    forest: str, spec: ElmForestSpec, manifest: Manifest | None, pending: list[str]
) -> MixStep | None:
    """The mix to make now; None when disabled, waiting, or the recorded one is current."""
    if not spec.mix.enabled or manifest is None or manifest.seed is None:
        return None
    if pending or not manifest.experts:
        return None
    key = mix_key(spec, manifest)
    experts = {e.domain: e.version for e in manifest.sorted_experts()}
    current = manifest.mix
    if current is not None and current.mix.key == key and current.experts() == experts:
        return None
    number = current.mix.number + 1 if current is not None else 1
    argv = mix_argv(spec, number, key, experts)
    name = forest_job_name(forest, ROLE, digest(argv))
    return MixStep(number, key, experts, mix_run_id(number, key), name, argv)


def mix_problem(spec: ElmForestSpec, manifest: Manifest) -> str | None:
    """Why the mix cannot be made from this forest, naming the field; None if it can."""
    family = spec.model.model_dump().get("family")
    if not spec.model.model_dump().get("pretrained") and family not in MIXABLE:
        return (
            f"spec.mix: a {family} forest cannot be mixed; mixing makes a Mixtral model from "
            f"Llama-family experts (spec.model.family: {', '.join(MIXABLE)})"
        )
    if spec.mix.top_k > len(manifest.experts):
        return (
            f"spec.mix.topK {spec.mix.top_k} is above the {len(manifest.experts)} experts "
            "merged (choose at most that many)"
        )
    return None


def recorded(entry: MixEntry | None, uri: str) -> MixStatus:
    """The status of the mix the manifest records (phase Ready), or an empty one."""
    if entry is None:
        return MixStatus()
    lineage = entry.lineage
    return MixStatus(
        phase="Ready",
        revision=entry.mix.number,
        uri=f"{uri.rstrip('/')}/{entry.path}",
        sha256=entry.sha256,
        experts=entry.experts(),
        weights={p.domain: p.weight for p in entry.parents if p.domain},
        top_k=entry.mix.top_k,
        router=entry.mix.router,
        router_only=entry.mix.router_only,
        finetune_steps=entry.mix.steps,
        val_perplexity_before=entry.metrics.val_ppl_before,
        val_perplexity_after=entry.metrics.val_ppl_after,
        data_sha256=lineage.data_sha256 if lineage and lineage.data else None,
        message=f"mix v{entry.mix.number} of {len(entry.parents)} experts",
    )


@dataclass(frozen=True)
class MixInput:
    forest: str
    namespace: str
    uid: str
    spec: ElmForestSpec
    manifest: Manifest
    pending: list[str]
    jobs: dict[str, JobState]
    records: RunRecords  # the desired mix run's


def plan_mix(inp: MixInput) -> tuple[MixStatus | None, list[Action]]:
    """The forest's mix status and what to do for it."""
    spec, manifest = inp.spec, inp.manifest
    if not spec.mix.enabled:
        return None, []  # disabled: nothing made, nothing removed (docs/btx.md)
    status = recorded(manifest.mix, spec.storage.uri)
    step = desired_mix(inp.forest, spec, manifest, inp.pending)
    # The Job of the mix wanted, or of the one recorded (its pod may still be finishing).
    keep = step.job_name if step is not None else _recorded_job(inp.forest, spec, manifest)
    stale = [
        DeleteJob(name, "its mix is superseded")
        for name, job in inp.jobs.items()
        if _is_mix_job(name) and job.phase == "Running" and name != keep
    ]
    if step is None:
        if inp.pending:
            status.phase = "Waiting" if manifest.mix is None else "Ready"
            status.message = f"waiting for branches {', '.join(inp.pending)}"
        elif not manifest.experts:
            status.message = "waiting for a merged expert"
        return status, list(stale)
    problem = mix_problem(spec, manifest)
    if problem is not None:
        status.phase, status.message = "Failed", problem
        return status, list(stale)
    result = inp.records.result
    if result is not None and result.mix is not None and result.mix.key == step.key:
        status.phase, status.message = "Mixing", f"recording mix v{step.number}"
        return status, [*stale, MergeResult(result)]
    job = inp.jobs.get(step.job_name)
    if job is not None and job.phase == "Failed":
        progress = inp.records.progress
        why = progress.message if progress and progress.phase == "failed" else job.message
        status.phase, status.message = "Failed", f"{step.job_name}: {why}"
        return status, list(stale)
    actions: list[Action] = list(stale)
    if job is None:
        actions.append(CreateJob(build_job(_request(inp, step))))
    status.phase = "Mixing"
    status.message = f"mix v{step.number} of {len(step.experts)} experts: Job {step.job_name}"
    progress = inp.records.progress
    if progress is not None and progress.total_steps:
        status.message += f" (step {progress.step}/{progress.total_steps})"
    return status, actions


_MIX_JOB = re.compile(rf"-{ROLE}-[0-9a-f]{{6}}$")  # forest_job_name's suffix, kept when shortened


def _recorded_job(forest: str, spec: ElmForestSpec, manifest: Manifest) -> str | None:
    entry = manifest.mix
    if entry is None:
        return None
    argv = mix_argv(spec, entry.mix.number, entry.mix.key, entry.experts())
    return forest_job_name(forest, ROLE, digest(argv))


def _is_mix_job(name: str) -> bool:
    return _MIX_JOB.search(name) is not None


def _request(inp: MixInput, step: MixStep) -> JobRequest:
    return JobRequest(
        name=step.job_name,
        namespace=inp.namespace,
        owner=Owner(FOREST.kind, inp.forest, inp.uid),
        forest=inp.forest,
        role=ROLE,
        run_id=step.run_id,
        argv=step.argv,
        trainer=inp.spec.trainer,
        storage=inp.spec.storage,
    )

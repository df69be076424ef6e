"""The prepare step, planned purely: a CPU-only Job of ``elmtrain prepare`` that turns a branch's
(or the seed's) text into token shards before its training Job, unless the shards exist.

Whether they exist is one record per list of locations (``tokens/sets/<key>.json``, keyed by
the manifest's tokenizer and the locations), which the reconciler looks up; the trainer checks
the record against the files themselves, so text changed in place is tokenized again.

With ``spec.prepare.parallelism`` N above 1 the Job is Indexed (N completions, N pods at once),
each pod tokenizing one slice of the files; no step follows it, since the last pod to finish
combines the slices into the dataset record (``elmtrain prepare --workers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elmcore.names import RunId
from elmforest.api.forest import ElmForestSpec, TrainerSpec
from elmforest.planner.jobs import JobRequest, Owner, build_job
from elmforest.planner.observed import JobState, RunRecords
from elmforest.planner.trainer_args import forest_args


@dataclass(frozen=True)
class Preparation:
    """What the planners know of one prepare step."""

    needed: bool  # the shards of this step's text are not recorded as prepared yet
    job: JobState | None = None  # the step's prepare Job, as watched
    records: RunRecords = field(default_factory=RunRecords)  # its progress (bytes of text read)


@dataclass(frozen=True)
class PrepareStep:
    """Which prepare Job and run belong to a version (or the seed), and the location lists
    (training, validation) that it tokenizes."""

    job_name: str
    run: RunId
    datasets: tuple[list[str], list[str]]


def prepare_argv(
    forest: ElmForestSpec, data: list[str], val_data: list[str], run_id: str
) -> list[str]:
    argv = ["prepare", *forest_args(forest), "--run-id", run_id, "--data", *data]
    if val_data:
        argv += ["--val-data", *val_data]
    # Each pod of the Indexed Job tokenizes the slice of its JOB_COMPLETION_INDEX; the last to
    # finish writes the dataset record, so the step is done when the Job is.
    workers = forest.prepare.parallelism
    return [*argv, "--workers", str(workers)] if workers > 1 else argv


def prepare_trainer(forest: ElmForestSpec) -> TrainerSpec:
    """The forest's trainer settings for a prepare Job: its image and account, the prepare
    step's own resources and placement, no GPUs."""
    prepare = forest.prepare
    return forest.trainer.model_copy(
        update={
            "gpus": 0,
            "resources": prepare.resources,
            "node_selector": prepare.node_selector,
            "tolerations": prepare.tolerations,
            "priority_class_name": prepare.priority_class_name,
            "queue_name": prepare.queue_name,
            "backoff_limit": prepare.backoff_limit,
        }
    )


def prepare_job(
    name: str,
    namespace: str,
    owner: Owner,
    forest_name: str,
    forest: ElmForestSpec,
    run: RunId,
    data: tuple[list[str], list[str]],
    branch: str | None = None,
) -> dict[str, object]:
    request = JobRequest(
        name=name,
        namespace=namespace,
        owner=owner,
        forest=forest_name,
        role="prepare",
        run_id=str(run),
        argv=prepare_argv(forest, data[0], data[1], str(run)),
        trainer=prepare_trainer(forest),
        storage=forest.storage,
        branch=branch,
        completions=forest.prepare.parallelism,
    )
    return build_job(request)


def progress_summary(records: RunRecords) -> str:
    progress = records.progress
    if progress is None or not progress.total_steps:
        return ""
    percent = 100 * progress.step // progress.total_steps
    return f"{percent}% of {progress.total_steps / 1e6:.1f} MB of text"

"""The operator's view of a forest's storage: manifest, run records, merges and removals.

Blocking (boto3); the reconcilers call it from worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import assert_never

from pydantic import ValidationError

from elmcore import layout
from elmcore.errors import ElmError
from elmcore.manifest import ExpertEntry, Manifest, remove_expert
from elmcore.names import RunId, parse_version_dir
from elmcore.records import AssignmentRecord, Progress, Result, ServingRecord
from elmcore.storage import S3Credentials, Storage, open_storage
from elmcore.storage.commit import read_marker
from elmcore.storage.manifest_store import load_manifest, merge_verified, update_manifest
from elmforest.api.forest import StorageSpec
from elmforest.planner.actions import (
    DeleteExpertFiles,
    MergeResult,
    RemoveExpert,
    StorageAction,
)
from elmforest.planner.clusterset import AssignmentCounts
from elmforest.planner.observed import JobState, RunRecords, StorageView
from elmforest.planner.prepare import Preparation

FOREST_ROLES = ("tokenizer", "seed")  # built in this order before any branch


class ForestStorage:
    def __init__(self, spec: StorageSpec, credentials: S3Credentials | None = None) -> None:
        self.storage: Storage = open_storage(
            spec.uri, endpoint=spec.endpoint, region=spec.region, credentials=credentials
        )

    def view(self) -> StorageView:
        try:
            manifest, _ = load_manifest(self.storage)
        except ElmError as error:
            return StorageView(error=f"cannot read the manifest: {error}")
        except ValidationError as error:
            return StorageView(
                error=f"the manifest is invalid: {error}", error_reason="BadManifest"
            )
        return StorageView(manifest=manifest)

    def observe_forest(self) -> tuple[StorageView, dict[str, RunRecords]]:
        """The manifest, and the records of the first forest artifact not merged yet."""
        view = self.view()
        records: dict[str, RunRecords] = {}
        if view.manifest is not None:
            missing = [r for r in FOREST_ROLES if getattr(view.manifest, r) is None]
            if missing:
                role = missing[0]
                records[role] = self.records(RunId.seed() if role == "seed" else RunId.tokenizer())
        return view, records

    def prepared(self, tokenizer_sha256: str, datasets: Sequence[list[str]]) -> bool:
        """Whether ``elmtrain prepare`` recorded the shards of each (non-empty) location list
        under this tokenizer (the trainer re-checks the files themselves)."""
        return all(
            self.storage.exists(layout.dataset_record(tokenizer_sha256, locations))
            for locations in datasets
            if locations
        )

    def preparation(
        self,
        manifest: Manifest | None,
        datasets: Sequence[list[str]],
        job: JobState | None,
        run: RunId | None,
    ) -> Preparation | None:
        """A prepare step's state: not needed once its datasets are recorded; else its Job
        (as watched) and, once that runs, its progress. None before there is a tokenizer."""
        if manifest is None or manifest.tokenizer is None:
            return None
        if self.prepared(manifest.tokenizer.sha256, datasets):
            return Preparation(needed=False)
        # A failed Job's pods are gone, but its progress says why (bad input names the file).
        ran = job is not None and (job.started or job.phase == "Failed")
        return Preparation(True, job, self.records(run) if ran and run else RunRecords())

    def serving_records(self) -> list[ServingRecord]:
        """What each serving replica last said it serves (``serving/<replica>.json``)."""
        records = []
        for key in self.storage.list_keys(layout.SERVING):
            found = self.storage.read_versioned(key)
            if found is None:
                continue
            try:
                records.append(ServingRecord.model_validate_json(found[0]))
            except ValidationError as error:  # a foreign file: reported on the forest, skipped
                name = key.rsplit("/", 1)[-1].removesuffix(".json")
                why = f"{key} is not a serving record ({error.error_count()} errors): skipped"
                records.append(ServingRecord(replica=name, message=why))
        return records

    def observe_branch(
        self,
        domain: str,
        version: int | None,
        manifest: Manifest | None = None,
        used: Mapping[str, int] | None = None,
    ) -> tuple[RunRecords, ExpertEntry | None]:
        """A branch version's run records, and the manifest's entry for its domain (from
        ``manifest`` when the caller has just read it, else read here). A branch without a
        version yet is given ``used`` (``used_versions``, one listing shared by a batch) and
        learns the highest version its domain left in storage."""
        if version:
            records = self.records(RunId.branch(domain, version))
        else:
            records = RunRecords(used_version=(used or {}).get(domain, 0))
        merged = manifest.experts.get(domain) if manifest else self.merged_expert(domain)
        return records, merged

    def used_versions(self) -> dict[str, int]:
        """Each domain's highest version with runs or expert files in storage. A re-created
        branch must not resume, or take as its own, an earlier branch's run of the same
        number (one that retention Keep left behind)."""
        found: dict[str, int] = {}

        def seen(domain: str, version: int) -> None:
            found[domain] = max(found.get(domain, 0), version)

        for name in self.storage.list_children("runs"):
            run = RunId.parse(name)
            if run is not None and run.domain is not None and run.version is not None:
                seen(run.domain, run.version)  # a branch version's training or prepare run
        for key in self.storage.list_keys("experts"):
            parts = key.split("/")
            version = parse_version_dir(parts[2]) if len(parts) > 2 else None
            if version is not None:
                seen(parts[1], version)
        return found

    def apply(self, action: StorageAction) -> str:
        """Carry out a storage action; returns a line for the log."""
        match action:
            case MergeResult(result=result):
                manifest = self.merge(result)
                line = f"merged {result.run_id} (manifest revision {manifest.revision})"
                if result.kind == "mix" and manifest.mix and manifest.mix.run_id == result.run_id:
                    line += f"; deleted {self.delete_superseded_mixes(manifest)} older mix objects"
                return line
            case RemoveExpert(domain=domain):
                manifest = self.remove_expert(domain)
                return f"removed expert {domain} (manifest revision {manifest.revision})"
            case DeleteExpertFiles(domain=domain):
                return f"deleted {self.delete_expert_files(domain)} objects of expert {domain}"
            case _:
                assert_never(action)

    def merged_expert(self, domain: str) -> ExpertEntry | None:
        """The manifest's entry for ``domain`` (None if absent or the manifest is unreadable)."""
        manifest = self.view().manifest
        return manifest.experts.get(domain) if manifest else None

    def _record(self, key: str, model: type[Progress] | type[Result]) -> Progress | Result | None:
        found = self.storage.read_versioned(key)
        if found is None:
            return None
        try:
            return model.model_validate_json(found[0])
        except ValidationError:
            return None  # a torn or foreign file reads as "not there yet"

    def records(self, run: RunId | str) -> RunRecords:
        progress = self._record(layout.run_progress(str(run)), Progress)
        result = self._record(layout.run_result(str(run)), Result)
        assert progress is None or isinstance(progress, Progress)
        assert result is None or isinstance(result, Result)
        return RunRecords(progress=progress, result=result)

    def cluster_set(self, name: str, workers: int) -> tuple[str | None, list[AssignmentCounts]]:
        """A cluster set version's clusterer (its marker's sha256; None until committed) and
        the assignment records its workers wrote so far (torn or foreign ones skipped)."""
        found = read_marker(self.storage, layout.clusterer(name))
        if found is None:
            return None, []
        counts = []
        for index in range(workers):
            raw = self.storage.read_versioned(layout.cluster_assignment(name, index))
            if raw is None:
                continue
            try:
                record = AssignmentRecord.model_validate_json(raw[0])
            except ValidationError:
                continue
            counts.append(AssignmentCounts(record.clusterer, index, record.train, record.valid))
        return found[1], counts

    def merge(self, result: Result) -> Manifest:
        return merge_verified(self.storage, result)

    def remove_expert(self, domain: str) -> Manifest:
        return update_manifest(self.storage, lambda manifest: remove_expert(manifest, domain))

    def delete_superseded_mixes(self, manifest: Manifest) -> int:
        """The folders of the mixes before the recorded one: kept until it was committed and
        recorded (they were served until then), never named by a manifest again. A server
        still on an older revision has its mix in its local cache."""
        assert manifest.mix is not None
        names = self.storage.list_children(layout.MOE)
        stale = layout.superseded_mixes(names, manifest.mix.mix.number)
        return sum(self.storage.delete_prefix(prefix) for prefix in stale)

    def delete_expert_files(self, domain: str) -> int:
        """The domain's expert files and every run of its versions (training and prepare)."""
        deleted = self.storage.delete_prefix(f"experts/{domain}")
        for name in self.storage.list_children("runs"):
            run = RunId.parse(name)
            if run is not None and run.domain == domain:
                deleted += self.storage.delete_prefix(layout.run(name))
        return deleted

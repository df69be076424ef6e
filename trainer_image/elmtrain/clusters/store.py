"""A fitted clusterer in the forest's storage: numbers and words, never pickle.

``clusters/<set>/clusterer/`` holds ``clusterer.json`` (settings, vocabulary, documents fitted)
and ``clusterer.safetensors`` (idf and centres), committed as every artifact is (a marker with
each file's sha256, written last; ``elmcore.storage.commit``). The marker's sha256 names the
clusterer: the set's status records it, and a reader given it refuses any other bytes; every
read verifies each file against the marker, so a corrupted file is refused too.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.numpy import load_file, save_file

from elmcore import layout
from elmcore.errors import BadInputError, IntegrityError
from elmcore.manifest import ExpertEntry
from elmcore.storage import Storage
from elmcore.storage.base import sha256_bytes
from elmcore.storage.commit import commit_dir, fetch_committed, read_marker
from elmtrain.cache import cache_dir
from elmtrain.clusters.fit import Clusterer, ClusterSettings
from elmtrain.clusters.routing import ClusterRouter, expert_clusters

DESCRIPTION = "clusterer.json"
ARRAYS = "clusterer.safetensors"


class ClustererFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = 1
    settings: ClusterSettings
    vocabulary: list[str]
    fitted_documents: int


def save_clusterer(storage: Storage, name: str, clusterer: Clusterer) -> str:
    """Commit the clusterer of set ``name``; returns its sha256."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp)
        description = ClustererFile(
            settings=clusterer.settings,
            vocabulary=clusterer.vocabulary,
            fitted_documents=clusterer.fitted_documents,
        )
        (folder / DESCRIPTION).write_text(description.model_dump_json())
        arrays = {"idf": clusterer.idf, "centres": clusterer.centres, "prices": clusterer.prices}
        save_file(arrays, str(folder / ARRAYS))
        return commit_dir(storage, folder, layout.clusterer(name))


def clusterer_size(storage: Storage, name: str, expected_sha256: str) -> int:
    """The number of clusters of set ``name``'s clusterer, which must be ``expected_sha256``:
    the marker and ``clusterer.json`` only (its bytes checked against the marker), not the
    arrays. What ``elmtrain branch --cluster`` checks before it trains."""
    key = layout.clusterer(name)
    found = read_marker(storage, key)
    if found is None:
        raise BadInputError(f"cluster set {name!r} has no fitted clusterer at {storage.uri(key)}")
    marker, sha = found
    if sha != expected_sha256:
        raise BadInputError(
            f"{storage.uri(key)} is clusterer {sha[:12]}, not {expected_sha256[:12]} "
            "(refitted since the branch was planned?)"
        )
    data = storage.read_bytes(f"{key}/{DESCRIPTION}")
    digest = marker.files.get(DESCRIPTION)
    if digest is None or sha256_bytes(data) != digest.sha256:
        raise IntegrityError(f"{storage.uri(key)}/{DESCRIPTION} does not match its marker")
    try:
        description = ClustererFile.model_validate_json(data)
    except (ValidationError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{storage.uri(key)}/{DESCRIPTION}: unreadable ({error})") from None
    return description.settings.clusters


def load_clusterer(
    storage: Storage, name: str, expected_sha256: str | None = None
) -> tuple[Clusterer, str]:
    """The committed clusterer of set ``name`` and its sha256, every file verified."""
    key = layout.clusterer(name)
    found = read_marker(storage, key)
    if found is None:
        raise BadInputError(f"cluster set {name!r} has no fitted clusterer at {storage.uri(key)}")
    sha = found[1]
    if expected_sha256 is not None and sha != expected_sha256:
        raise IntegrityError(
            f"{storage.uri(key)} is clusterer {sha[:12]}, not {expected_sha256[:12]}"
        )
    target = cache_dir() / "clusterers" / sha
    fetch_committed(storage, key, target, sha)  # small: fetched and verified on every load
    try:
        description = ClustererFile.model_validate_json((target / DESCRIPTION).read_text())
    except (ValidationError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{storage.uri(key)}/{DESCRIPTION}: unreadable ({error})") from None
    arrays = load_file(str(target / ARRAYS))
    idf, centres, prices = (np.asarray(arrays[n]) for n in ("idf", "centres", "prices"))
    if centres.shape != (description.settings.clusters, len(description.vocabulary)):
        raise IntegrityError(f"{storage.uri(key)}: centres of shape {centres.shape} do not fit")
    clusterer = Clusterer(
        settings=description.settings,
        vocabulary=description.vocabulary,
        idf=idf,
        centres=centres,
        prices=prices,
        fitted_documents=description.fitted_documents,
    )
    return clusterer, sha


def load_router(storage: Storage, experts: Sequence[ExpertEntry]) -> ClusterRouter:
    """The router of experts trained on clusters (their lineage names one clusterer), with that
    clusterer loaded and verified; a BadInputError naming the experts that cannot be routed."""
    clusters = expert_clusters(experts)
    clusterer, _ = load_clusterer(storage, clusters.set, clusters.clusterer_sha256)
    return ClusterRouter(clusterer, clusters)


def resolve_set(storage: Storage, name: str) -> str:
    """The storage name of cluster set ``name``: ``name`` itself where it holds a clusterer,
    else the one version an ``ElmClusterSet`` of that name keeps (the operator stores each in
    ``clusters/<name>-<digest8>/``, its ``status.storageName``). Several versions: the caller
    must name one; none: ``name`` (loading it then says there is no clusterer)."""
    if read_marker(storage, layout.clusterer(name)) is not None:
        return name
    version = re.compile(rf"{re.escape(name)}-[0-9a-f]{{8}}")
    found = [
        child
        for child in storage.list_children(layout.CLUSTERS)
        if version.fullmatch(child) and read_marker(storage, layout.clusterer(child)) is not None
    ]
    if len(found) > 1:
        raise BadInputError(
            f"cluster set {name!r} has {len(found)} versions ({', '.join(found)}): pass --set "
            "the one you mean (an ElmClusterSet's status.storageName is its current one)"
        )
    return found[0] if found else name

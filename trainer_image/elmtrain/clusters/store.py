"""A fitted clusterer in the forest's storage: numbers and words, never pickle.

``clusters/<set>/clusterer/`` holds ``clusterer.json`` (settings, vocabulary, documents fitted)
and ``clusterer.safetensors`` (idf and centres), committed as every artifact is (a marker with
each file's sha256, written last; ``elmcore.storage.commit``). The marker's sha256 names the
clusterer: the set's status records it, and a reader given it refuses any other bytes; every
read verifies each file against the marker, so a corrupted file is refused too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.numpy import load_file, save_file

from elmcore import layout
from elmcore.errors import BadInputError, IntegrityError
from elmcore.storage import Storage
from elmcore.storage.commit import commit_dir, fetch_committed, read_marker
from elmtrain.cache import cache_dir
from elmtrain.clusters.fit import Clusterer, ClusterSettings

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

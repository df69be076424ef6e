"""Committed artifacts: a folder is readable only once its marker, written last, exists.

The marker lists every file's sha256 and size; readers verify both, so a half-written or
corrupted checkpoint is never loaded. The sha256 of the marker's bytes names the artifact.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from elmcore import layout
from elmcore.errors import IntegrityError, NotFoundError
from elmcore.records import CommitMarker, FileDigest
from elmcore.storage.base import Storage, sha256_bytes, sha256_file


def _join(prefix: str, name: str) -> str:
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


def commit_dir(storage: Storage, local_dir: Path, key: str, step: int | None = None) -> str:
    """Upload every file of ``local_dir`` under ``key``, then the marker. Returns its sha256."""
    files = sorted(p for p in local_dir.iterdir() if p.is_file() and p.name != layout.COMMIT_MARKER)
    # Un-commit first: if this key held an older artifact, nobody may read a mix of the two.
    storage.delete(_join(key, layout.COMMIT_MARKER))
    digests = {}
    for path in files:
        digests[path.name] = FileDigest(sha256=sha256_file(path), size=path.stat().st_size)
        storage.upload_file(_join(key, path.name), path)
    data = CommitMarker(files=digests, step=step).model_dump_json(indent=1).encode()
    storage.write_bytes(_join(key, layout.COMMIT_MARKER), data)
    return sha256_bytes(data)


def read_marker(storage: Storage, key: str) -> tuple[CommitMarker, str] | None:
    """The marker of a committed folder and its sha256, or None if the folder is uncommitted."""
    try:
        data = storage.read_bytes(_join(key, layout.COMMIT_MARKER))
    except NotFoundError:
        return None
    return CommitMarker.model_validate_json(data), sha256_bytes(data)


def _require_marker(storage: Storage, key: str, expected_sha256: str | None) -> CommitMarker:
    found = read_marker(storage, key)
    if found is None:
        raise IntegrityError(f"{storage.uri(key)} is not committed (no {layout.COMMIT_MARKER})")
    marker, sha = found
    if expected_sha256 is not None and sha != expected_sha256:
        raise IntegrityError(f"{storage.uri(key)} holds other bytes than recorded ({sha[:12]})")
    return marker


def verify_committed(
    storage: Storage, key: str, expected_sha256: str | None = None
) -> CommitMarker:
    """Check, without downloading, that ``key`` is committed, its files exist with the recorded
    sizes, and (if given) that its marker is the expected one."""
    marker = _require_marker(storage, key, expected_sha256)
    for name, digest in marker.files.items():
        size = storage.size(_join(key, name))
        if size != digest.size:
            raise IntegrityError(f"{storage.uri(_join(key, name))}: size {size} != {digest.size}")
    return marker


def fetch_committed(
    storage: Storage, key: str, target: Path, expected_sha256: str | None = None
) -> CommitMarker:
    """Download a committed folder into ``target`` (replaced whole), verifying every file."""
    marker = _require_marker(storage, key, expected_sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for name, digest in marker.files.items():
            path = staging / name
            storage.download_file(_join(key, name), path)
            actual = sha256_file(path)
            if actual != digest.sha256:
                raise IntegrityError(
                    f"{storage.uri(_join(key, name))}: sha256 {actual[:12]} != {digest.sha256[:12]}"
                )
        (staging / layout.COMMIT_MARKER).write_text(marker.model_dump_json(indent=1))
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return marker


def committed_steps(storage: Storage, checkpoints_key: str) -> list[int]:
    """Steps of the committed checkpoints below ``checkpoints_key``, ascending."""
    steps = []
    for name in storage.list_children(checkpoints_key):
        step = layout.parse_checkpoint_step(name)
        if step is not None and storage.exists(
            _join(_join(checkpoints_key, name), layout.COMMIT_MARKER)
        ):
            steps.append(step)
    return sorted(steps)

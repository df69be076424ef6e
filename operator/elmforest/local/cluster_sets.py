"""Local mode's side of ``ElmClusterSet``: the branches a set generates become records of the
state (as the API server stores what the operator applies), owned by the set, and go when it
goes (as Kubernetes' garbage collector deletes what an owner reference names)."""

from __future__ import annotations

from typing import Any

from elmforest.api import CLUSTER_SET
from elmforest.local.state import LocalState, ObjectRecord


def owner_of(name: str) -> str:
    return f"{CLUSTER_SET.kind}/{name}"


def generated_branches(state: LocalState, set_name: str) -> list[ObjectRecord]:
    owner = owner_of(set_name)
    return [b for b in state.branches.values() if b.owner == owner]


def apply_branch(state: LocalState, body: dict[str, Any], source: str) -> bool:
    """Create or update a generated branch (server-side apply's effect); True if it changed.

    The planner never asks for a branch of the same name that the set does not own."""
    meta = body["metadata"]
    name, spec = meta["name"], body["spec"]
    owner = f"{meta['ownerReferences'][0]['kind']}/{meta['ownerReferences'][0]['name']}"
    record = state.branches.get(name)
    if record is None:
        state.branches[name] = ObjectRecord(
            kind="ElmBranch",
            name=name,
            created=state.stamp(),
            source=source,
            spec=spec,
            owner=owner,
            labels=dict(meta.get("labels") or {}),
        )
        return True
    assert record.owner == owner, f"ElmBranch {name!r} is not {owner}'s"
    if record.spec == spec and not record.deleting:
        return False
    record.spec, record.generation, record.deleting = spec, record.generation + 1, False
    return True


def release(state: LocalState, record: ObjectRecord) -> bool:
    """A deleted set's branches are marked for deletion; True once none is left."""
    branches = generated_branches(state, record.name)
    for branch in branches:
        branch.deleting = True
    return not branches

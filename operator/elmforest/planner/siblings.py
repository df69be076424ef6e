"""The branches of one forest as the planners see each other: domain ownership and the forest.

Shared by the operator (which reads them from its indexes) and local mode (from its state).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from elmforest.api.forest import ElmForestSpec
from elmforest.planner.branch import ACTIVE, ForestView
from elmforest.planner.defaults import Defaults


@dataclass(frozen=True)
class Sibling:
    """What is kept of each branch: enough for ownership and slots."""

    name: str
    domain: str
    created: str
    phase: str
    deleting: bool


def sibling(body: Mapping[str, Any]) -> Sibling:
    meta, spec = body["metadata"], body.get("spec") or {}
    return Sibling(
        name=meta["name"],
        domain=str(spec.get("domain", "")),
        created=str(meta.get("creationTimestamp", "")),
        phase=str((body.get("status") or {}).get("phase", "Pending")),
        deleting=bool(meta.get("deletionTimestamp")),
    )


class ForestBranches:
    """A forest's branches as one reconcile batch sees them. The maps derived from them are
    computed once per batch, not once per branch: a thousand branches, not a million steps."""

    def __init__(self, siblings: list[Sibling]) -> None:
        self.siblings = siblings

    @cached_property
    def owners(self) -> dict[str, str]:
        return owners_by_domain(self.siblings)

    @cached_property
    def active(self) -> frozenset[str]:
        """The branches holding a training slot."""
        return frozenset(s.name for s in self.siblings if s.phase in ACTIVE)


def owners_by_domain(siblings: Iterable[Sibling]) -> dict[str, str]:
    """Each domain's owner: its oldest live branch (ties: by name)."""
    owners: dict[str, str] = {}
    for branch in sorted(siblings, key=lambda s: (s.created, s.name)):
        if not branch.deleting:
            owners.setdefault(branch.domain, branch.name)
    return owners


def domain_owner(siblings: Iterable[Sibling], domain: str) -> str | None:
    return owners_by_domain(siblings).get(domain)


def owner_before_deletion(siblings: Iterable[Sibling], name: str, domain: str) -> str | None:
    """The domain's owner as it stood before ``name`` was deleted (it counts as live)."""
    live = [
        Sibling(s.name, s.domain, s.created, s.phase, s.deleting and s.name != name)
        for s in siblings
    ]
    return domain_owner(live, domain)


def forest_view(
    forest: Mapping[str, Any] | None, defaults: Defaults | None = None, *, deleting: bool = False
) -> ForestView | None:
    """The forest a branch grows from; None while it is missing, invalid or (unless the
    branch is being deleted too, and must still leave its manifest) deleted."""
    if forest is None or (forest["metadata"].get("deletionTimestamp") and not deleting):
        return None
    try:
        spec = ElmForestSpec.model_validate(forest.get("spec") or {})
        if defaults is not None:
            spec = defaults.apply(spec)
    except ValidationError:
        return None
    phase = (forest.get("status") or {}).get("phase")
    return ForestView(
        forest["metadata"]["name"],
        spec,
        phase == "Ready",
        forest["metadata"].get("uid", ""),
        observed=phase is not None,
    )

"""Fields that may not change once set (the CRDs' ``self == oldSelf`` rules), found in one place.

The cluster enforces them with CEL; local mode, which has no API server, asks this module.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from elmforest.api.base import SpecModel
from elmforest.api.rules import IMMUTABLE

_RULE = IMMUTABLE.rule


def _is_immutable(extra: object) -> bool:
    rules = extra.get("x-kubernetes-validations", []) if isinstance(extra, dict) else []
    return any(isinstance(r, dict) and r.get("rule") == _RULE for r in rules)


def changed_immutable_fields(old: BaseModel, new: BaseModel, prefix: str = "spec") -> list[str]:
    """Paths (``spec.storage.uri``) of immutable fields whose value differs between two specs."""
    changed: list[str] = []
    for name, info in type(new).model_fields.items():
        path = f"{prefix}.{info.alias or name}"
        before: Any = getattr(old, name, None)
        after: Any = getattr(new, name, None)
        if _is_immutable(info.json_schema_extra):
            if before is not None and before != after:
                changed.append(path)
        elif isinstance(before, SpecModel) and isinstance(after, SpecModel):
            changed += changed_immutable_fields(before, after, path)
    return changed

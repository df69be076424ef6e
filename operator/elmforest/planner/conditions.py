"""Condition bookkeeping (API conventions: a transition time moves only when status flips)."""

from __future__ import annotations

from typing import Literal

from elmforest.api.base import Condition

READY = "Ready"
MIX_READY = "MixReady"  # the forest's mix (spec.mix): recorded and current


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    generation: int | None,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; other types are kept in order."""
    old = next((c for c in conditions if c.type == type_), None)
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:4096],
        observed_generation=generation,
    )
    if old is not None and old.status == status:
        new.last_transition_time = old.last_transition_time
    kept = [c for c in conditions if c.type != type_]
    return [*kept, new] if old is None else [new if c.type == type_ else c for c in conditions]


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)

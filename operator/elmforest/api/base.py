"""Shared building blocks of the resource models: camelCase fields, conditions, quantities."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A location the trainer reads (s3://bucket/key, file:///path): no control characters.
LOCATION = r"^[^\x00-\x1f\x7f]+$"

# Kubernetes quantities (``4``, ``16Gi``, ``500m``): an integer or a string, as core types do.
Quantity = Annotated[
    int | str,
    Field(
        json_schema_extra={"x-kubernetes-int-or-string": True},
        union_mode="left_to_right",
    ),
]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SpecModel(BaseModel):
    """A user-written part: camelCase, and unknown fields are an error (they are typos)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class StatusModel(BaseModel):
    """An operator-written part: tolerant on read, so old operators read newer statuses."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(StatusModel):
    """A Kubernetes-style condition (API conventions: type, status, reason, message)."""

    type: str = Field(max_length=64)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=128)
    message: str = Field("", max_length=4096)
    observed_generation: int | None = None
    last_transition_time: str = Field(default_factory=now_iso)


def partial_model(
    base: type[BaseModel],
    name: str,
    doc: str,
    *,
    exclude: frozenset[str] = frozenset(),
    extra: dict[str, Any] | None = None,
) -> type[SpecModel]:
    """``base``'s fields, all optional with no default, camelCased: a set of overrides.

    Used where a resource overrides a config whose defaults live elsewhere (the forest's branch
    defaults, then the trainer's), so the bounds stay defined once, in ``elmcore.config``.
    """
    fields: dict[str, Any] = {}
    for field_name, info in base.model_fields.items():
        if field_name in exclude:
            continue
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        fields[field_name] = (annotation | None, Field(None, description=info.description))
    fields.update(extra or {})
    model: type[SpecModel] = create_model(name, __base__=SpecModel, __doc__=doc, **fields)
    return model

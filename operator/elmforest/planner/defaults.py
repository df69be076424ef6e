"""Install-time defaults (the Helm chart's ``trainer`` and ``storage`` values) under a forest.

A field the forest sets wins; a field it leaves unset takes the chart's value. Pure: the
defaults arrive as JSON in the operator's environment and are parsed once at startup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from elmcore.errors import BadInputError
from elmforest.api.chart import StorageDefaults, TrainerDefaults
from elmforest.api.forest import ElmForestSpec

TRAINER_ENV = "ELMFOREST_TRAINER_DEFAULTS"
STORAGE_ENV = "ELMFOREST_STORAGE_DEFAULTS"


def _parse(model: type[BaseModel], text: str | None, name: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        parsed = model.model_validate(json.loads(text))
    except (ValueError, ValidationError) as error:
        raise BadInputError(f"${name} is not valid: {error}") from None
    dumped: dict[str, Any] = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dumped


@dataclass(frozen=True)
class Defaults:
    trainer: dict[str, Any] = field(default_factory=dict)  # camelCase, as in a spec
    storage: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Defaults:
        return cls(
            _parse(TrainerDefaults, env.get(TRAINER_ENV), TRAINER_ENV),
            _parse(StorageDefaults, env.get(STORAGE_ENV), STORAGE_ENV),
        )

    def apply(self, spec: ElmForestSpec) -> ElmForestSpec:
        if not self.trainer and not self.storage:
            return spec
        data = spec.model_dump(by_alias=True, exclude_unset=True, mode="json")
        data["trainer"] = {**self.trainer, **data.get("trainer", {})}
        if spec.storage.uri.startswith("s3://"):
            data["storage"] = {**self.storage, **data["storage"]}
        return ElmForestSpec.model_validate(data)

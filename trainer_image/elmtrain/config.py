"""Config parsing for the CLI; the config models themselves live in ``elmcore.config``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from elmcore.config import ModelConfig, TrainingConfig
from elmcore.errors import BadInputError

C = TypeVar("C", bound=BaseModel)

__all__ = ["ModelConfig", "TrainingConfig", "load_json_arg", "parse_config"]


def load_json_arg(text: str | None, what: str) -> dict[str, object]:
    """A JSON object given inline or as ``@path`` (so Job specs can pass it either way)."""
    if not text:
        return {}
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{what}: cannot read JSON ({error})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{what}: expected a JSON object")
    return value


def parse_config(cls: type[C], data: dict[str, object], what: str) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BadInputError(f"{what}: {field}: {first['msg']}") from None

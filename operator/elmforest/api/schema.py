"""pydantic JSON Schema -> Kubernetes structural OpenAPI v3 schema (for CRDs).

Kubernetes accepts a subset of OpenAPI v3.0: no ``$ref``, no ``null`` types, boolean
``exclusiveMinimum``, no ``additionalProperties: false`` beside ``properties``. This module turns
what pydantic emits into that subset, so the models stay the one source of truth.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]
_DROP = {"title", "additionalProperties", "$defs"}


def crd_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}))


def _convert(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = _resolve(node, defs)
    node = _strip_null(node, defs)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "anyOf":
            out.update(_any_of(value, defs))
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = _convert(additional, defs)
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = defs[ref.rsplit("/", 1)[-1]]
    # Field-level keys (description, default, CEL rules) win over the referenced model's.
    merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return _resolve(merged, defs)


def _strip_null(node: Schema, defs: dict[str, Schema]) -> Schema:
    options = node.get("anyOf")
    if not options:
        return node
    kept = [o for o in options if o.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(kept) == 1:
        # Optional[X]: the field is simply not required. Outer keys win (description, CEL).
        inner = _resolve(kept[0], defs)
        return {**inner, **rest}
    return {**rest, "anyOf": kept}


def _any_of(options: list[Schema], defs: dict[str, Schema]) -> Schema:
    types = {o.get("type") for o in options}
    if types == {"integer", "string"}:
        return {"x-kubernetes-int-or-string": True}
    raise ValueError(f"unsupported union in a CRD schema: {options}")

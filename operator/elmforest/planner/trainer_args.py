"""The ``elmtrain`` command lines of the forest's and branches' Jobs."""

from __future__ import annotations

import json
from typing import Any

from elmcore.config import ModelConfig, TrainingConfig
from elmforest.api.base import SpecModel
from elmforest.api.branch import ElmBranchSpec
from elmforest.api.forest import ElmForestSpec


def overrides(model: SpecModel | None) -> dict[str, Any]:
    """Set fields of an override model, by their Python (snake_case) names."""
    return {} if model is None else model.model_dump(exclude_none=True, mode="json")


def effective_training(defaults: SpecModel | None, own: SpecModel | None) -> TrainingConfig:
    """Trainer defaults, then the forest's branch defaults, then the branch's own settings."""
    return TrainingConfig.model_validate({**overrides(defaults), **overrides(own)})


def forest_args(spec: ElmForestSpec) -> list[str]:
    args = ["--forest", spec.storage.uri]
    if spec.storage.endpoint:
        args += ["--s3-endpoint", spec.storage.endpoint]
    if spec.storage.region:
        args += ["--s3-region", spec.storage.region]
    return args


def _compact(model: TrainingConfig | ModelConfig) -> str:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def tokenizer_argv(spec: ElmForestSpec) -> list[str]:
    argv = ["tokenizer", *forest_args(spec)]
    if spec.tokenizer.from_:
        return [*argv, "--from", spec.tokenizer.from_]
    data = spec.tokenizer.data or spec.seed.data
    return [*argv, "--data", *data, "--vocab-size", str(spec.tokenizer.vocab_size)]


def seed_argv(spec: ElmForestSpec) -> list[str]:
    argv = ["seed", *forest_args(spec)]
    if spec.seed.data:
        argv += ["--data", *spec.seed.data]
    if spec.seed.val_data:
        argv += ["--val-data", *spec.seed.val_data]
    model = overrides(spec.model)
    pretrained = model.pop("pretrained", None)
    if pretrained:
        argv += ["--pretrained", pretrained]
    else:
        argv += ["--model", _compact(ModelConfig.model_validate(model))]
    training = TrainingConfig.model_validate(overrides(spec.seed.training))
    return [*argv, "--training", _compact(training)]


def branch_argv(forest: ElmForestSpec, branch: ElmBranchSpec, version: int) -> list[str]:
    argv = ["branch", *forest_args(forest), "--domain", branch.domain, "--version", str(version)]
    argv += ["--data", *branch.data.train]
    if branch.data.validation:
        argv += ["--val-data", *branch.data.validation]
    argv += ["--init", branch.init.strategy.value, "--init-sample", str(branch.init.sample_size)]
    if branch.init.top_k is not None:
        argv += ["--top-k", str(branch.init.top_k)]
    if branch.init.copy_from:
        argv += ["--copy-from", branch.init.copy_from]
    training = effective_training(forest.branch_defaults, branch.training)
    return [*argv, "--training", _compact(training)]

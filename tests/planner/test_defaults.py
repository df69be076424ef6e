"""Install-time defaults fill what a forest leaves unset, and never override what it sets."""

from __future__ import annotations

import json

import pytest

from elmcore.errors import BadInputError
from elmforest.api.forest import ElmForestSpec
from elmforest.planner.defaults import STORAGE_ENV, TRAINER_ENV, Defaults

IMAGE = "registry.example.com/trainer@sha256:" + "1" * 64
ENV = {
    TRAINER_ENV: json.dumps(
        {
            "image": IMAGE,
            "gpus": 1,
            "queueName": "team-a",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        }
    ),
    STORAGE_ENV: json.dumps({"endpoint": "http://minio:9000", "credentialsSecret": "s3"}),
}


def spec(**fields: object) -> ElmForestSpec:
    return ElmForestSpec.model_validate({"storage": {"uri": "s3://bucket/f"}, **fields})


def test_defaults_fill_unset_fields() -> None:
    filled = Defaults.from_env(ENV).apply(spec())
    assert filled.trainer.image == IMAGE and filled.trainer.gpus == 1
    assert filled.trainer.queue_name == "team-a"
    assert filled.trainer.tolerations[0].key == "nvidia.com/gpu"
    assert filled.storage.endpoint == "http://minio:9000"
    assert filled.storage.credentials_secret == "s3"


def test_the_forest_wins() -> None:
    own = spec(
        trainer={"gpus": 0, "tolerations": []},
        storage={"uri": "s3://bucket/f", "endpoint": "https://s3.example.com"},
    )
    filled = Defaults.from_env(ENV).apply(own)
    assert filled.trainer.gpus == 0 and filled.trainer.tolerations == []
    assert filled.trainer.image == IMAGE  # unset by the forest: the default
    assert filled.storage.endpoint == "https://s3.example.com"


def test_local_storage_takes_no_s3_defaults_and_no_env_changes_nothing() -> None:
    local = ElmForestSpec.model_validate({"storage": {"uri": "file:///tmp/f"}})
    assert Defaults.from_env(ENV).apply(local).storage.endpoint is None
    assert Defaults.from_env({}).apply(local) is local


def test_bad_defaults_fail_at_startup() -> None:
    with pytest.raises(BadInputError, match=TRAINER_ENV):
        Defaults.from_env({TRAINER_ENV: json.dumps({"gpus": "many"})})
    with pytest.raises(BadInputError, match=STORAGE_ENV):
        Defaults.from_env({STORAGE_ENV: "{not json"})

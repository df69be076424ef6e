"""spec.mix in local mode: ``elmforest up`` on a tiny Llama forest of two branches trains,
merges, then mixes the experts into one MoE model and finetunes it (one Job), records it in
the manifest once, ``elmtrain serve`` serves it as ``tiny/moe`` (the official client), and a
rerun changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from elmforest.api.forest import ElmForestSpec
from elmforest.local.resources import load
from elmforest.planner.mix import MIXABLE
from tests.harness.serve import serving

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "quickstart" / "data"
DOMAINS = ("code", "quotes")
TINY = {"batchSize": 4, "seqLen": 32, "warmupSteps": 1, "evalBatches": 1}

pytestmark = pytest.mark.slow


def write_forest(folder: Path) -> None:
    train = [str(DATA / d / "train.txt") for d in DOMAINS]
    valid = [str(DATA / d / "valid.txt") for d in DOMAINS]
    forest = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmForest",
        "metadata": {"name": "tiny"},
        "spec": {
            "storage": {"uri": ".elmforest/storage"},
            "model": {
                "family": "llama", "dModel": 32, "nLayers": 1, "nHeads": 2, "contextLength": 32
            },
            "tokenizer": {"vocabSize": 300},
            "seed": {"data": train, "valData": valid, "training": {**TINY, "steps": 4}},
            "branchDefaults": {**TINY, "steps": 3},
            "mix": {"enabled": True, "topK": 2, "steps": 3},
        },
    }  # fmt: skip
    docs = [forest]
    for domain in DOMAINS:
        docs.append(
            {
                "apiVersion": "btm.elmforest.io/v1alpha1",
                "kind": "ElmBranch",
                "metadata": {"name": domain},
                "spec": {
                    "forest": "tiny",
                    "domain": domain,
                    "data": {
                        "train": [str(DATA / domain / "train.txt")],
                        "validation": [str(DATA / domain / "valid.txt")],
                    },
                },
            }
        )
    (folder / "forest.yaml").write_text(yaml.safe_dump_all(docs))


def elmforest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elmforest", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_up_mixes_the_merged_experts_once(tmp_path: Path) -> None:
    write_forest(tmp_path)
    state_dir = tmp_path / ".elmforest"
    done = elmforest("up", "-f", str(tmp_path), "--no-report")
    assert done.returncode == 0, done.stdout + done.stderr
    storage = state_dir / "storage"
    manifest = read_json(storage / "manifest.json")
    mix = manifest["mix"]
    assert mix is not None, done.stdout
    experts = {d: manifest["experts"][d]["version"] for d in DOMAINS}
    assert {p["domain"]: p["version"] for p in mix["parents"]} == experts
    assert mix["mix"]["number"] == 1 and mix["mix"]["steps"] == 3 and mix["mix"]["top_k"] == 2
    folder = storage / mix["path"]
    config = read_json(folder / "config.json")
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == len(DOMAINS)
    lineage = read_json(folder / "mix.json")
    assert {e["domain"]: e["version"] for e in lineage["experts"]} == experts
    assert (storage / mix["mix"]["untrained_path"] / "config.json").exists()  # before finetuning
    data = mix["lineage"]["data"]
    assert data and all(len(source["sha256"]) == 64 for source in data)
    state = read_json(state_dir / "state.json")
    status = state["forests"]["tiny"]["status"]["mix"]
    assert status["phase"] == "Ready" and status["revision"] == 1
    assert status["experts"] == experts and status["finetuneSteps"] == 3
    mix_jobs = [j for j in state["jobs"].values() if j["role"] == "mix"]
    assert len(mix_jobs) == 1, state["jobs"]

    # Served: <forest>/moe is listed beside the ensemble and answers a completion.
    with serving(str(storage), tmp_path, "--name", "tiny") as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        assert {"tiny", "tiny/moe", "tiny/expert/code"} <= {m.id for m in client.models.list()}
        answer = client.completions.create(
            model="tiny/moe", prompt="import os", max_tokens=6, temperature=0.7, seed=1
        )
        (choice,) = answer.choices
        assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="mixes every expert"):
            client.completions.create(
                model="tiny/moe",
                prompt="x",
                max_tokens=2,
                extra_body={"elmforest": {"experts": {"exclude": ["code"]}}},
            )

    # Again: the mix is current; no Job, no merge.
    before = (storage / "manifest.json").read_text()
    again = elmforest("up", "-f", str(tmp_path), "--no-report")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (storage / "manifest.json").read_text() == before
    state = read_json(state_dir / "state.json")
    assert len([j for j in state["jobs"].values() if j["role"] == "mix"]) == 1


def test_the_btx_example_declares_a_mixable_forest() -> None:
    """examples/btx/ (docs/btx.md) loads as local mode reads it, its text exists, and it mixes."""
    declared = load([REPO / "examples" / "btx"])
    (forest,) = declared.forests.values()
    spec = forest.spec
    assert isinstance(spec, ElmForestSpec)
    assert spec.mix.enabled and spec.model.model_dump()["family"] in MIXABLE
    assert sorted(declared.branches) == ["code", "legal", "quotes", "scripture"]
    for name in declared.branches:
        for location in declared.branch_spec(name).data.train:
            assert Path(location.removeprefix("file://")).is_file(), location

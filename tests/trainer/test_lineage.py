"""Lineage: every merged expert records what made it (data with content hashes, the effective
config, tokenizer and seed sha256, trainer image, elmtrain version), and ``elmtrain lineage``
prints it as a tree through its parents to the seed. The cached prior: computed once per
manifest revision and question, stored with the forest, read back by every command."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from elmcore.priors import StoredPrior
from elmtrain.run.lineage import elmtrain_version
from tests.conftest import elmtrain, training

IMAGE = "registry.example/elmtrain@sha256:" + "5" * 64


def branch(forest: Path, corpus: Path, domain: str) -> None:
    elmtrain("branch", "--forest", str(forest), "--domain", domain,
             "--data", str(corpus / domain / "train.txt"),
             "--val-data", str(corpus / domain / "valid.txt"),
             "--training", training(steps=6), "--merge",
             env={"ELMTRAIN_IMAGE": IMAGE})  # fmt: skip


@pytest.fixture(scope="module")
def two_experts(
    seeded_forest: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    forest = tmp_path_factory.mktemp("lineage") / "forest"
    shutil.copytree(seeded_forest, forest)
    branch(forest, corpus, "cooking")
    branch(forest, corpus, "sailing")  # posterior init: cooking is its parent
    return forest


def test_experts_record_and_print_their_lineage(two_experts: Path, corpus: Path) -> None:
    forest = two_experts

    manifest = json.loads((forest / "manifest.json").read_text())
    sailing = manifest["experts"]["sailing"]["lineage"]
    text = corpus / "sailing" / "train.txt"
    assert sailing["data"] == [
        {
            "location": str(text),
            "key": "",
            "size": text.stat().st_size,
            "sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
        }
    ]
    assert sailing["val_data"][0]["location"] == str(corpus / "sailing" / "valid.txt")
    assert sailing["training"]["steps"] == 6 and sailing["training"]["seq_len"] == 64
    assert sailing["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    assert sailing["seed_sha256"] == manifest["seed"]["sha256"]
    assert sailing["image"] == IMAGE and sailing["elmtrain_version"] == elmtrain_version()
    assert manifest["seed"]["lineage"]["data"]  # the seed's mixture, recorded the same way

    tree = elmtrain("lineage", "--forest", str(forest), "sailing").stdout.splitlines()
    sha = manifest["experts"]["sailing"]["sha256"]
    assert tree[0] == f"sailing v1  sha256 {sha[:12]}"
    digest = sailing["data"][0]["sha256"][:12]
    assert f"├─ data: {text}  {text.stat().st_size:,} bytes  sha256 {digest}" in tree
    cooking = next(line for line in tree if "parent" in line and "cooking v1" in line)
    assert cooking.startswith("└─ parent 1.000: cooking v1")
    assert any(line.startswith("   └─ parent 1.000: seed  sha256") for line in tree)
    assert sum(f"trainer: {IMAGE}" in line for line in tree) == 2  # the seed ran without one
    as_json = json.loads(elmtrain("lineage", "--forest", str(forest), "sailing", "--json").stdout)
    assert as_json["lineage"] == sailing


def stored_priors(forest: Path) -> dict[str, StoredPrior]:
    return {
        str(p.relative_to(forest)): StoredPrior.model_validate_json(p.read_text())
        for p in sorted((forest / "priors").rglob("*.json"))
    }


def test_the_cached_prior_is_stored_once_per_revision_and_read_back(
    two_experts: Path, corpus: Path, tmp_path: Path
) -> None:
    forest = tmp_path / "forest"
    shutil.copytree(two_experts, forest)
    revision = json.loads((forest / "manifest.json").read_text())["revision"]
    held_out = str(corpus / "cooking" / "valid.txt")
    first = json.loads(elmtrain("posterior", "--forest", str(forest), "--data", held_out).stdout)
    assert first["cooking"] > first["sailing"]
    (key, stored), *_ = stored_priors(forest).items()
    assert key.startswith(f"priors/rev-{revision:08d}/") and stored.weights == first
    assert (
        stored.question.data[0].sha256
        == hashlib.sha256((corpus / "cooking" / "valid.txt").read_bytes()).hexdigest()
    )

    # Read back, not recomputed: a marked record comes back as it is, from every command
    # that needs this prior (here the posterior and ensemble-eval).
    marked = stored.model_copy(update={"weights": {"cooking": 0.625, "sailing": 0.375}})
    (forest / key).write_text(marked.model_dump_json())
    again = json.loads(elmtrain("posterior", "--forest", str(forest), "--data", held_out).stdout)
    assert again == marked.weights
    report = json.loads(
        elmtrain(
            "ensemble-eval",
            "--forest",
            str(forest),
            "--data",
            f"cooking={held_out}",
            "--prior-data",
            f"cooking={held_out}",
            "--prior-sample",
            "100",
            "--seq-len",
            "64",
        ).stdout
    )
    assert report["domains"]["cooking"]["prior"] == marked.weights

    # generate: no prior data given, so the experts' validation text, stored too.
    elmtrain("generate", "--forest", str(forest), "--ensemble", "--prompt", "salt",
             "--max-new-tokens", "4")  # fmt: skip
    default = [p for k, p in stored_priors(forest).items() if k != key]
    assert len(default) == 1
    assert sorted(f.location for f in default[0].question.data) == sorted(
        str(corpus / d / "valid.txt") for d in ("cooking", "sailing")
    )

    # A new revision (another expert merged) asks anew.
    branch(forest, corpus, "finance")
    elmtrain("posterior", "--forest", str(forest), "--data", held_out)
    newer = [k for k in stored_priors(forest) if not k.startswith(f"priors/rev-{revision:08d}/")]
    assert len(newer) == 1 and set(stored_priors(forest)[newer[0]].weights) == {
        "cooking",
        "finance",
        "sailing",
    }

"""An ElmClusterSet in local mode (c-BTM, issue 30): ``elmforest up`` clusters one unlabeled
corpus (the quickstart's code and quotes text pooled into JSON lines, labels removed), trains
one branch per cluster from the seed, and merges them, each expert's lineage naming its
cluster; ``elmtrain assign`` prints the same assignment the workers made; the server routes
by cluster as the forest asks; a rerun changes nothing; a new k is a new version; removing the
set removes its branches and their experts; too few documents fail the set at once."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from elmforest.api.forest import ElmForestSpec
from elmforest.local.commands import serve_argv
from elmforest.local.resources import load
from tests.harness.serve import serving

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "quickstart" / "data"
TINY = {"batchSize": 4, "seqLen": 32, "warmupSteps": 1, "evalBatches": 1}

pytestmark = pytest.mark.slow


def documents(domain: str) -> list[str]:
    text = (DATA / domain / "train.txt").read_text()
    return [d.strip() for d in text.split("\n\n\n") if d.strip()]


def write_corpus(path: Path) -> dict[str, str]:
    """code + quotes, shuffled into one JSON-lines file; returns each text's hidden label."""
    labelled = [(text, domain) for domain in ("code", "quotes") for text in documents(domain)]
    random.Random(0).shuffle(labelled)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in labelled))
    return dict(labelled)


def write_files(folder: Path, clusters: int, with_set: bool = True) -> None:
    forest = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmForest",
        "metadata": {"name": "tiny"},
        "spec": {
            "storage": {"uri": ".elmforest/storage"},
            "model": {"family": "llama", "dModel": 32, "nLayers": 1, "nHeads": 2,
                      "contextLength": 32},
            "tokenizer": {"vocabSize": 300},
            "seed": {"data": ["corpus.jsonl"], "training": {**TINY, "steps": 4}},
            "branchDefaults": {**TINY, "steps": 3},
            "serving": {"routing": "clusters"},
        },
    }  # fmt: skip
    cluster_set = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmClusterSet",
        "metadata": {"name": "topics"},
        "spec": {
            "forest": "tiny",
            "data": ["corpus.jsonl"],
            "clusters": clusters,
            "sample": 500,
            "balance": False,
            "validationFraction": 0.1,
            "parallelism": 2,
        },
    }
    (folder / "forest.yaml").write_text(yaml.safe_dump(forest))
    path = folder / "clusters.yaml"
    if with_set:
        path.write_text(yaml.safe_dump(cluster_set))
    elif path.exists():
        path.unlink()


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )


def up(folder: Path) -> subprocess.CompletedProcess[str]:
    return run(folder, "elmforest", "up", "-f", ".", "--no-report")


def state(folder: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((folder / ".elmforest" / "state.json").read_text())
    return loaded


def manifest(folder: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (folder / ".elmforest" / "storage" / "manifest.json").read_text()
    )
    return loaded


def test_a_cluster_set_in_local_mode(tmp_path: Path) -> None:
    labels = write_corpus(tmp_path / "corpus.jsonl")
    write_files(tmp_path, clusters=2)
    done = up(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    first = state(tmp_path)
    status = first["cluster_sets"]["topics"]["status"]
    assert status["phase"] == "Ready", status
    assert status["documents"] == len(labels) and sum(status["clusterSizes"]) == len(labels)
    assert status["branches"] == ["topics-c0", "topics-c1"]
    for name in status["branches"]:
        branch = first["branches"][name]
        assert branch["owner"] == "ElmClusterSet/topics" and branch["status"]["phase"] == "Merged"
        assert branch["spec"]["cluster"]["clustererSha256"] == status["clustererSha256"]
    experts = manifest(tmp_path)["experts"]
    assert sorted(experts) == ["topics-c0", "topics-c1"]
    for index, name in enumerate(sorted(experts)):  # which clusterer made which expert
        cluster = experts[name]["lineage"]["cluster"]
        assert cluster == {
            "set": status["storageName"],
            "index": index,
            "clusterer_sha256": status["clustererSha256"],
        }

    # The set's own assignment, by hand: `elmtrain assign` puts each document where the
    # workers did (their files), and the two clusters are the hidden domains.
    key = status["storageName"]
    forest = str(tmp_path / ".elmforest" / "storage")
    shown = run(tmp_path, "elmtrain", "assign", "--forest", forest, "--set", key,
                "--data", "corpus.jsonl")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    indexes = [int(line) for line in shown.stdout.split()]
    texts = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").open()]
    assert len(indexes) == len(texts)
    in_files: dict[str, int] = {}
    for path in (Path(forest) / "clusters" / key / "data").glob("c*/*/part-*.jsonl"):
        for line in path.open():
            in_files[json.loads(line)["text"]] = int(path.parent.parent.name[1:])
    assert in_files == dict(zip(texts, indexes, strict=True))
    purity = sum(
        max(sum(1 for t, i in zip(texts, indexes, strict=True) if i == c and labels[t] == d)
            for d in ("code", "quotes"))
        for c in (0, 1)
    ) / len(texts)  # fmt: skip
    assert purity >= 0.9, purity

    # Served with the forest's routing default (spec.serving.routing: clusters, as
    # `elmforest serve -f` passes it): the prompt's clusters pick the experts; a request may
    # ask for the posterior instead.
    spec = load([tmp_path / "forest.yaml"]).forests["tiny"].spec
    assert isinstance(spec, ElmForestSpec)
    argv = serve_argv("tiny", spec, "127.0.0.1", 0, 2)
    assert argv[argv.index("--routing") + 1] == "clusters"
    code = next(t for t in texts if labels[t] == "code")[:24]  # the model sees 32 tokens
    with serving(forest, tmp_path, "--name", "tiny", "--routing", "clusters") as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model="tiny", prompt=code, max_tokens=4, seed=1)
        assert (answer.model_extra or {})["elmforest"]["routed_by"] == "clusters"
        answer = client.completions.create(
            model="tiny",
            prompt=code,
            max_tokens=4,
            extra_body={"elmforest": {"routing": "posterior"}},
        )
        assert (answer.model_extra or {})["elmforest"]["routed_by"] == "posterior"

    # Nothing to do on a rerun: the state stays as it was.
    again = up(tmp_path)
    assert again.returncode == 0 and state(tmp_path) == first, again.stdout

    # A new k is a new version: three branches on the new version's folders.
    write_files(tmp_path, clusters=3)
    done = up(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    second = state(tmp_path)
    status = second["cluster_sets"]["topics"]["status"]
    assert status["version"] == 2 and status["storageName"] != key
    assert status["phase"] == "Ready" and len(status["branches"]) == 3
    c0 = second["branches"]["topics-c0"]
    assert status["storageName"] in c0["spec"]["data"]["train"][0]
    assert c0["status"]["version"] == 2  # retrained on its new data
    experts = manifest(tmp_path)["experts"]
    assert sorted(experts) == status["branches"]

    # Removing the set removes its branches, and their experts leave the forest.
    write_files(tmp_path, clusters=3, with_set=False)
    done = up(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    third = state(tmp_path)
    assert third["cluster_sets"] == {} and third["branches"] == {}
    assert manifest(tmp_path)["experts"] == {}


def test_too_few_documents_fail_the_set_once(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in documents("code")[:3])
    )
    write_files(tmp_path, clusters=4)
    done = up(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    status = state(tmp_path)["cluster_sets"]["topics"]["status"]
    assert status["phase"] == "Failed" and "fewer than 4 clusters" in status["message"]
    assert status["conditions"][0]["reason"] == "BadInput"
    jobs = state(tmp_path)["jobs"]
    (fit,) = [j for j in jobs.values() if j["owner"] == "ElmClusterSet/topics"]
    # Bad input: the Job failed by its failure policy on the first exit 65, never retried.
    assert (fit["phase"], fit["reason"], fit["failures"]) == ("Failed", "PodFailurePolicy", 0)

"""Routing by cluster (c-BTM, issue 30 point 3) through the real CLI, as Jobs would run it: a
clusterer fitted by ``cluster-fit`` on three synthetic domains, one tiny expert per cluster
trained with ``branch --cluster`` (recorded in its lineage and the manifest), then
``ensemble-eval --routing clusters``, ``average --weights clusters`` and ``elmtrain serve``
(the server's ``--routing`` default, a request's ``elmforest.routing``, a bad value's 400),
and the refusals: a bad ``--cluster``, experts without a cluster or of two clusterers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from elmcore import layout
from elmcore.manifest import Manifest
from elmcore.storage import open_storage
from elmtrain.clusters.store import load_clusterer
from tests.conftest import elmtrain, training
from tests.harness.serve import Served, serving
from tests.serving.test_scoring import post

DOMAINS = ("cooking", "sailing", "finance")
SET = "web"
NAME = "forest"
COOKING = "Simmer the onion and garlic in butter, then whisk in the flour and stir"


@pytest.fixture(scope="module")
def clustered(
    tmp_path_factory: pytest.TempPathFactory, seeded_forest: Path, corpus: Path
) -> tuple[Path, str, dict[str, int]]:
    """The forest with set ``web``'s clusterer and an expert per cluster (named after the
    domain whose documents fall in it), and the clusterer's sha256."""
    forest = tmp_path_factory.mktemp("clustered") / "forest"
    shutil.copytree(seeded_forest, forest)
    texts = [str(corpus / d / "train.txt") for d in DOMAINS]
    fitted = elmtrain(
        "cluster-fit", "--forest", str(forest), "--set", SET, "--data", *texts,
        "--clusters", "3", "--no-balance", "--sample", "1000",
    )  # fmt: skip
    sha = json.loads(fitted.stdout)["sha256"]
    clusterer, _ = load_clusterer(open_storage(str(forest)), SET, sha)
    index = {}
    for domain in DOMAINS:
        documents = (corpus / domain / "valid.txt").read_text().split("\n\n\n")
        index[domain] = int(np.bincount(clusterer.assign(documents)).argmax())
    assert sorted(index.values()) == [0, 1, 2]
    for domain in DOMAINS:
        elmtrain("branch", "--forest", str(forest), "--domain", domain,
                 "--data", str(corpus / domain / "train.txt"),
                 "--val-data", str(corpus / domain / "valid.txt"), "--init", "seed",
                 "--cluster", f"{SET}:{index[domain]}:{sha}",
                 "--training", training(steps=20), "--merge")  # fmt: skip
    return forest, sha, index


def manifest(forest: Path) -> Manifest:
    return Manifest.model_validate_json((forest / layout.MANIFEST).read_bytes())


def test_branch_records_its_cluster(clustered: tuple[Path, str, dict[str, int]]) -> None:
    forest, sha, index = clustered
    for domain in DOMAINS:
        entry = manifest(forest).experts[domain]
        assert entry.lineage is not None and entry.lineage.cluster is not None
        cluster = entry.lineage.cluster
        assert (cluster.set, cluster.index, cluster.clusterer_sha256) == (SET, index[domain], sha)
        result = json.loads((forest / layout.run(entry.run_id or "") / "result.json").read_text())
        assert result["lineage"]["cluster"]["index"] == index[domain]


@pytest.mark.parametrize(
    ("cluster", "says"),
    [
        ("web:0", "--cluster 'web:0': expected SET:INDEX:SHA256"),
        ("web:3:{sha}", "set 'web' has 3 clusters (0..2), not cluster 3"),
        ("web:0:" + "c" * 64, "is clusterer"),
        ("news:0:{sha}", "cluster set 'news' has no fitted clusterer"),
    ],
)
def test_a_bad_cluster_exits_65_before_training(
    clustered: tuple[Path, str, dict[str, int]], corpus: Path, cluster: str, says: str
) -> None:
    forest, sha, _ = clustered
    done = elmtrain(
        "branch", "--forest", str(forest), "--domain", "poetry",
        "--data", str(corpus / "poetry" / "train.txt"), "--init", "seed",
        "--cluster", cluster.format(sha=sha), "--training", training(steps=2), check=False,
    )  # fmt: skip
    assert done.returncode == 65, done.stderr[-2000:]
    assert says in done.stderr
    assert "poetry" not in manifest(forest).experts


def ensemble_eval(forest: Path, corpus: Path, *extra: str, check: bool = True) -> Any:
    data = [f"{d}={corpus / d / 'valid.txt'}" for d in DOMAINS]
    done = elmtrain(
        "ensemble-eval", "--forest", str(forest), "--data", *data, "--seq-len", "64",
        "--max-sequences", "6", *extra, check=check,
    )  # fmt: skip
    return json.loads(done.stdout) if check else done


def test_ensemble_eval_routes_by_cluster(
    clustered: tuple[Path, str, dict[str, int]], corpus: Path
) -> None:
    forest, sha, _ = clustered
    report = ensemble_eval(
        forest, corpus, "--routing", "clusters", "--cluster-top-k", "1", "--top-k", "1"
    )
    assert report["routing"] == {
        "clusters": SET,
        "clusterer_sha256": sha,
        "temperature": 0.1,
        "top_k": 1,
    }
    for domain in DOMAINS:
        entry = report["domains"][domain]
        row = entry["clusters"]
        assert row["tokens"] == entry["full"]["tokens"] > 0
        assert np.isfinite(row["perplexity"])
        assert row["experts_per_token"] == 1.0  # top-1: one expert per token
        assert 1.0 <= row["experts_per_sequence"] <= 3.0
        assert row["routing_ms_per_token"] > 0
        # A domain's text routes to its own cluster's expert.
        assert max(row["mean_weights"], key=row["mean_weights"].get) == domain
        assert row["mean_weights"][domain] > 0.6, row["mean_weights"]
        # Posterior rows report their cost too: full and top-k run every expert, routed k.
        assert entry["full"]["experts_per_token"] == 3.0
        assert entry["routed1"]["experts_per_token"] == 1.0
    all_k = ensemble_eval(forest, corpus, "--routing", "clusters")
    assert all_k["domains"]["cooking"]["clusters"]["experts_per_token"] == 3.0
    posterior = ensemble_eval(forest, corpus)
    assert "clusters" not in posterior["domains"]["cooking"] and "routing" not in posterior


def test_average_weighs_experts_by_cluster(
    clustered: tuple[Path, str, dict[str, int]], corpus: Path, tmp_path: Path
) -> None:
    forest, _, _ = clustered
    done = elmtrain(
        "average", "--forest", str(forest), "--weights", "clusters",
        "--target-data", str(corpus / "sailing" / "valid.txt"), "--out", str(tmp_path / "avg"),
    )  # fmt: skip
    weights = json.loads(done.stdout)["weights"]
    assert max(weights, key=weights.get) == "sailing" and weights["sailing"] > 0.6, weights
    assert abs(sum(weights.values()) - 1) < 1e-9
    assert (tmp_path / "avg" / "COMMITTED.json").exists()


def edited(forest: Path, into: Path, change: dict[str, dict[str, Any] | None]) -> Path:
    """A copy of the forest whose manifest gives experts another lineage.cluster (None: none)."""
    shutil.copytree(forest, into)
    data = json.loads((into / layout.MANIFEST).read_text())
    for domain, cluster in change.items():
        lineage = data["experts"][domain]["lineage"]
        if cluster is None:
            lineage.pop("cluster")
        else:
            lineage["cluster"].update(cluster)
    (into / layout.MANIFEST).write_text(json.dumps(data))
    return into


def test_experts_that_cannot_be_routed_by_cluster_are_refused(
    clustered: tuple[Path, str, dict[str, int]], corpus: Path, tmp_path: Path
) -> None:
    forest, _, _ = clustered
    without = edited(forest, tmp_path / "without", {"finance": None})
    done = ensemble_eval(without, corpus, "--routing", "clusters", check=False)
    assert done.returncode == 65
    assert "experts finance were not trained on a cluster" in done.stderr
    two = edited(forest, tmp_path / "two", {"sailing": {"set": "news"}})
    done = ensemble_eval(two, corpus, "--routing", "clusters", check=False)
    assert done.returncode == 65
    assert "the experts come from 2 clusterers" in done.stderr
    assert "sailing of set news" in done.stderr
    done = elmtrain(
        "average", "--forest", str(two), "--weights", "clusters",
        "--target-data", str(corpus / "sailing" / "valid.txt"),
        "--out", str(tmp_path / "avg"), check=False,
    )  # fmt: skip
    assert done.returncode == 65 and "2 clusterers" in done.stderr
    done = ensemble_eval(
        forest, corpus, "--routing", "clusters", "--cluster-top-k", "0", check=False
    )
    assert done.returncode == 65 and "--cluster-top-k" in done.stderr


@pytest.fixture(scope="module")
def served(
    clustered: tuple[Path, str, dict[str, int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, Path]]:
    """The forest served with ``--routing clusters`` as its default, on a copy whose manifest
    the last test changes (the server follows it)."""
    forest = tmp_path_factory.mktemp("served-clusters") / "forest"
    shutil.copytree(clustered[0], forest)
    with serving(
        str(forest), tmp_path_factory.mktemp("serve-log"),
        *("--name", NAME, "--top-k", "1", "--routing", "clusters", "--poll-seconds", "0.5"),
    ) as server:  # fmt: skip
        yield server, forest


def complete(served: Served, **body: Any) -> tuple[int, Any]:
    return post(served, "/v1/completions", {"model": NAME, "max_tokens": 4, **body})


def test_server_routes_by_cluster_by_default_and_per_request(
    served: tuple[Served, Path],
) -> None:
    server, _ = served
    status, answer = complete(server, prompt=COOKING, seed=1)
    assert status == 200, answer
    assert answer["elmforest"]["routed_by"] == "clusters"
    (chosen,) = answer["elmforest"]["routing"][0]["experts"]  # top-1
    assert chosen["expert"] == "cooking" and chosen["weight"] == 1.0
    status, answer = complete(server, prompt=COOKING, seed=1, elmforest={"routing": "posterior"})
    assert status == 200 and answer["elmforest"]["routed_by"] == "posterior"
    # The average, and the allowed experts: the weights renormalised over them.
    status, answer = complete(
        server,
        model=f"{NAME}/average",
        prompt=COOKING,
        elmforest={"experts": {"exclude": ["cooking"]}, "routing": "clusters"},
    )
    assert status == 200, answer
    assert answer["elmforest"]["routed_by"] == "clusters"
    assert {e["expert"] for e in answer["elmforest"]["routing"][0]["experts"]} <= {
        "sailing",
        "finance",
    }
    # Scoring (echo, logprobs) routed by cluster: per position, by the text before it.
    status, answer = complete(
        server,
        prompt=COOKING,
        echo=True,
        logprobs=1,
        max_tokens=0,
        elmforest={"routing": "clusters"},
    )
    assert status == 200, answer
    scored = answer["choices"][0]["logprobs"]["token_logprobs"]
    assert scored[0] is None and all(np.isfinite(lp) and lp <= 0 for lp in scored[1:])
    # An expert alone is not routed: no routed_by.
    status, answer = complete(server, model=f"{NAME}/expert/sailing", prompt=COOKING)
    assert status == 200 and "routed_by" not in answer.get("elmforest", {})


@pytest.mark.parametrize("routing", ["nearest", 3, ""])
def test_a_bad_routing_is_a_400(served: tuple[Served, Path], routing: object) -> None:
    status, answer = complete(served[0], prompt=COOKING, elmforest={"routing": routing})
    assert status == 400
    error = answer["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "elmforest.routing"
    assert "posterior" in error["message"] and "clusters" in error["message"]


def test_experts_that_cannot_be_routed_refuse_clusters_asked_and_fall_back_by_default(
    served: tuple[Served, Path],
) -> None:
    """The manifest changes under the server: an expert without a cluster. A request asking
    for clusters is a 400 that names it; the server's default falls back to the posterior."""
    server, forest = served
    data = json.loads((forest / layout.MANIFEST).read_text())
    data["experts"]["finance"]["lineage"].pop("cluster")
    data["revision"] += 1
    (forest / layout.MANIFEST).write_text(json.dumps(data))
    server.wait_revision(data["revision"])
    status, answer = complete(server, prompt=COOKING, elmforest={"routing": "clusters"})
    assert status == 400, answer
    assert answer["error"]["param"] == "elmforest.routing"
    assert answer["error"]["code"] == "routing_unavailable"
    assert "experts finance were not trained on a cluster" in answer["error"]["message"]
    status, answer = complete(server, prompt=COOKING)
    assert status == 200 and answer["elmforest"]["routed_by"] == "posterior"

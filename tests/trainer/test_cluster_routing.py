"""Routing by cluster (c-BTM, issue 30 point 3), the pure parts: the weights function, the
experts' clusters from their lineage (one clusterer, or refused naming the experts), the
lineage's ``cluster`` left out of the JSON while unset, and ``branch --cluster``'s parsing.
The commands that use them run in tests/trainer/test_cluster_routing_cli.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from elmcore.errors import BadInputError
from elmcore.manifest import ExpertEntry, Manifest
from elmcore.records import ClusterLineage, Lineage, Result
from elmtrain.clusters.fit import ClusterSettings, fit_clusterer
from elmtrain.clusters.routing import (
    DEFAULT_TEMPERATURE,
    ClusterRouter,
    ExpertClusters,
    cluster_weights,
    expert_clusters,
    prefix_texts,
)
from elmtrain.commands.branch import parse_cluster
from tests.textgen import domain_text

SHA = "a" * 64
OTHER = "b" * 64
DOMAINS = ("cooking", "sailing", "finance")


def test_weights_are_a_softmax_of_negative_squared_distances() -> None:
    distances = np.array([[0.2, 0.5, 1.0], [1.0, 1.0, 1.0]])
    weights = cluster_weights(distances, temperature=0.1)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    expected = np.exp(-distances[0] / 0.1) / np.exp(-distances[0] / 0.1).sum()
    np.testing.assert_allclose(weights[0], expected)
    np.testing.assert_allclose(weights[1], 1 / 3)  # equidistant: uniform
    assert DEFAULT_TEMPERATURE == 0.1


def test_top_k_keeps_the_nearest_renormalised() -> None:
    distances = np.array([[0.9, 0.1, 0.5, 0.3], [0.4, 0.4, 0.4, 0.1]])
    weights = cluster_weights(distances, temperature=1.0, k=2)
    assert (weights > 0).sum(axis=1).tolist() == [2, 2]
    assert np.flatnonzero(weights[0]).tolist() == [1, 3]
    assert np.flatnonzero(weights[1]).tolist() == [0, 3]  # a tie: the lower index is kept
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    full = cluster_weights(distances, temperature=1.0)
    np.testing.assert_allclose(weights[0, [1, 3]], full[0, [1, 3]] / full[0, [1, 3]].sum())
    np.testing.assert_allclose(cluster_weights(distances, 1.0, k=9), full)  # k >= m: all


def test_temperature_limits() -> None:
    distances = np.array([[0.30, 0.31, 1.2]])
    cold = cluster_weights(distances, temperature=1e-4)
    np.testing.assert_allclose(cold, [[1.0, 0.0, 0.0]], atol=1e-12)  # the nearest alone
    hot = cluster_weights(distances, temperature=1e6)
    np.testing.assert_allclose(hot, 1 / 3, atol=1e-6)  # uniform
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(BadInputError, match="temperature"):
            cluster_weights(distances, temperature=bad)
    with pytest.raises(BadInputError, match="top-k"):
        cluster_weights(distances, k=0)


@pytest.fixture(scope="module")
def router() -> ClusterRouter:
    """A clusterer fitted by the real fit code on three synthetic domains; expert j is the
    cluster the domain's documents fall in (the experts in DOMAINS' order)."""
    texts = {d: domain_text(d, 40).split("\n\n\n") for d in DOMAINS}
    documents = [doc for d in DOMAINS for doc in texts[d]]
    clusterer, _ = fit_clusterer(documents, ClusterSettings(clusters=3, seed=0))
    indices = tuple(int(np.bincount(clusterer.assign(texts[d])).argmax()) for d in DOMAINS)
    assert sorted(indices) == [0, 1, 2]
    return ClusterRouter(clusterer, ExpertClusters("web", SHA, indices))


def test_a_context_routes_to_its_domains_cluster(router: ClusterRouter) -> None:
    held_out = {d: domain_text(d, 5, seed=7).split("\n\n\n") for d in DOMAINS}
    for expert, domain in enumerate(DOMAINS):
        weights = router.weights(held_out[domain])
        np.testing.assert_allclose(weights.sum(axis=1), 1.0)
        assert (weights.argmax(axis=1) == expert).all(), (domain, weights)
        assert weights[:, expert].min() > 0.9
        top1 = router.weights(held_out[domain], k=1)
        assert (top1[:, expert] == 1.0).all()
    # Only some experts allowed: their columns, renormalised; the others 0.
    among = router.weights(held_out["cooking"], among=[1, 2])
    assert (among[:, 0] == 0).all()
    np.testing.assert_allclose(among.sum(axis=1), 1.0)


def test_router_refuses_clusters_the_clusterer_lacks(router: ClusterRouter) -> None:
    with pytest.raises(BadInputError, match=r"clusters \[5\] of set web do not exist"):
        ClusterRouter(router.clusterer, ExpertClusters("web", SHA, (0, 5)))


def test_prefix_texts_are_the_context_of_each_scored_token() -> None:
    def decode(ids: list[int]) -> str:
        return "".join(chr(96 + i) for i in ids)

    assert prefix_texts(decode, [1, 2, 3, 4]) == ["a", "ab", "abc"]
    assert prefix_texts(decode, [1]) == []


def expert(domain: str, cluster: ClusterLineage | None) -> ExpertEntry:
    return ExpertEntry(
        path=f"experts/{domain}/v1",
        sha256=SHA,
        domain=domain,
        version=1,
        lineage=Lineage(cluster=cluster),
    )


def test_expert_clusters_of_one_clusterer() -> None:
    experts = [expert("web-c1", ClusterLineage(set="web", index=1, clusterer_sha256=SHA))]
    experts.append(expert("web-c0", ClusterLineage(set="web", index=0, clusterer_sha256=SHA)))
    assert expert_clusters(experts) == ExpertClusters("web", SHA, (1, 0))


@pytest.mark.parametrize(
    ("experts", "named"),
    [
        (
            [
                expert("web-c0", ClusterLineage(set="web", index=0, clusterer_sha256=SHA)),
                expert("legal", None),
                expert("code", None),
            ],
            r"experts legal, code were not trained on a cluster",
        ),
        (
            [
                expert("web-c0", ClusterLineage(set="web", index=0, clusterer_sha256=SHA)),
                expert("news-c0", ClusterLineage(set="news", index=0, clusterer_sha256=OTHER)),
            ],
            r"2 clusterers \(news-c0 of set news clusterer bbbbbbbbbbbb; web-c0 of set web",
        ),
        (
            [  # one set refitted: the same name, another clusterer
                expert("web-c0", ClusterLineage(set="web", index=0, clusterer_sha256=SHA)),
                expert("web-c1", ClusterLineage(set="web", index=1, clusterer_sha256=OTHER)),
            ],
            r"2 clusterers",
        ),
        (
            [
                expert("a", ClusterLineage(set="web", index=0, clusterer_sha256=SHA)),
                expert("b", ClusterLineage(set="web", index=0, clusterer_sha256=SHA)),
            ],
            r"experts a and b were both trained on cluster 0",
        ),
        ([], r"needs experts"),
    ],
)
def test_experts_that_cannot_be_routed_by_cluster_are_named(
    experts: list[ExpertEntry], named: str
) -> None:
    with pytest.raises(BadInputError, match=named):
        expert_clusters(experts)


def test_lineage_cluster_is_left_out_of_the_json_while_unset() -> None:
    """The previous release's operator forbids unknown fields: a lineage without a cluster
    must serialise exactly as before (no "cluster" key, not even null)."""
    plain = Lineage()
    assert "cluster" not in json.loads(plain.model_dump_json())
    assert "cluster" not in plain.model_dump()
    result = Result(run_id="r", kind="expert", path="experts/a/v1", sha256=SHA, lineage=plain)
    assert "cluster" not in json.loads(result.model_dump_json())["lineage"]
    clustered = Lineage(cluster=ClusterLineage(set="web", index=2, clusterer_sha256=SHA))
    data = json.loads(clustered.model_dump_json())
    assert data["cluster"] == {"set": "web", "index": 2, "clusterer_sha256": SHA}
    assert Lineage.model_validate_json(clustered.model_dump_json()) == clustered
    # The manifest's expert entries carry it: which clusterer produced which expert.
    manifest = Manifest(experts={"web-c2": expert("web-c2", clustered.cluster)})
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again.experts["web-c2"].lineage == clustered
    without = Manifest(experts={"a": expert("a", None)}).model_dump_json()
    assert '"cluster"' not in without


def test_an_old_manifest_still_reads() -> None:
    """A manifest written before lineage had a cluster (the previous release's format)."""
    old = {
        "schema_version": 1,
        "revision": 3,
        "experts": {
            "cooking": {
                "path": "experts/cooking/v1",
                "sha256": SHA,
                "run_id": "branch.cooking.v1",
                "lineage": {"data": [], "training": {"steps": 3}, "elmtrain_version": "0.1"},
                "domain": "cooking",
                "version": 1,
            }
        },
    }
    manifest = Manifest.model_validate_json(json.dumps(old))
    lineage = manifest.experts["cooking"].lineage
    assert lineage is not None and lineage.cluster is None
    assert "cluster" not in manifest.model_dump_json()


def test_cluster_lineage_is_checked() -> None:
    for bad in (
        {"set": "Web", "index": 0, "clusterer_sha256": SHA},
        {"set": "web", "index": -1, "clusterer_sha256": SHA},
        {"set": "web", "index": 0, "clusterer_sha256": "abc"},
    ):
        with pytest.raises(ValueError):
            ClusterLineage.model_validate(bad)


def test_parse_cluster() -> None:
    assert parse_cluster(f"web:3:{SHA}") == ClusterLineage(set="web", index=3, clusterer_sha256=SHA)
    for bad in (
        "web:3",
        f"web:3:{SHA}:x",
        f"web:-1:{SHA}",
        f"web:x:{SHA}",
        "web:3:ABC",
        f"web:3:{SHA.upper()}",
        f":3:{SHA}",
        f"Web_Set:3:{SHA}",
        "",
    ):
        with pytest.raises(BadInputError, match="--cluster"):
            parse_cluster(bad)


def test_the_lineage_tree_shows_the_cluster() -> None:
    from elmcore.lineage import lineage_tree

    cluster = ClusterLineage(set="web", index=2, clusterer_sha256=SHA)
    result = Result(
        run_id="branch.web-c2.v1",
        kind="expert",
        path="experts/web-c2/v1",
        sha256=SHA,
        domain="web-c2",
        version=1,
        lineage=Lineage(cluster=cluster),
    )
    lines = lineage_tree(result, lambda kind, domain, version: None)
    assert any(
        line.endswith("cluster: 2 of set web, clusterer sha256 aaaaaaaaaaaa") for line in lines
    )
    result.lineage = Lineage()
    assert not any("cluster:" in line for line in lineage_tree(result, lambda *_: None))

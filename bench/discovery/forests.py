"""What the discovery benchmark trains, with the real ``elmtrain`` commands the Jobs run.

The pooled corpus: every labelled domain's train (and valid) documents shuffled together, the
labels kept aside (``labels.json``) for the mutual information only. Per training seed s:

    seed       half the budget on the pooled text
    labelled   one expert per labelled domain, branched from the seed (BTM with metadata)
    k<k>       cluster-fit k clusters on the pooled text (seed s), cluster-assign it, and one
               expert per cluster from the seed, each given ``--cluster`` (c-BTM)
    dense      the seed trained on for the other half of the budget (compute matched)

Every forest spends the same half budget after the seed: k experts get half/k steps each.
Idempotent over a work folder, as bench/btm/recipes.py: ``--work DIR`` resumes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import structlog

from bench.btm.recipes import DOC_SEPARATOR, Recipes, copy_forest, elmtrain
from bench.discovery.scale import POOLED, DiscoveryScale

log = structlog.get_logger(__name__)
LABELS = "labels.json"  # the pooled train documents' hidden domains, in order


@dataclass(frozen=True)
class SeedRun:
    training_seed: int
    seed: Path
    labelled: Path
    dense: Path
    clustered: dict[int, Path]  # k -> the forest of k cluster experts


def pooled_corpus(source: Path, domains: tuple[str, ...], work: Path) -> Path:
    """A corpus folder beside ``source``'s domains (linked) with ``pooled/{train,valid}.txt``:
    the domains' documents shuffled together (fixed order: every training seed sees the same
    unlabeled text), and ``pooled/labels.json``, each train document's domain."""
    corpus = work / "corpus-pooled"
    pooled = corpus / POOLED
    if (pooled / LABELS).is_file():
        return corpus
    pooled.mkdir(parents=True, exist_ok=True)
    for domain in source.iterdir():
        if domain.is_dir() and not (corpus / domain.name).exists():
            (corpus / domain.name).symlink_to(domain.resolve())
    for split in ("train", "valid"):
        docs = [
            (domain, doc.strip("\n"))
            for domain in domains
            for doc in (source / domain / f"{split}.txt").read_text().split(DOC_SEPARATOR)
            if doc.strip()
        ]
        random.Random(f"pooled-{split}").shuffle(docs)
        (pooled / f"{split}.txt").write_text(DOC_SEPARATOR.join(d for _, d in docs) + "\n")
        if split == "train":
            (pooled / LABELS).write_text(json.dumps([label for label, _ in docs]))
    return corpus


def cluster_set(k: int) -> str:
    return f"k{k}"


def _clusterer_sha256(forest: Path, name: str) -> str | None:
    from elmcore import layout
    from elmcore.storage.commit import read_marker
    from elmtrain.forest import Forest

    found = read_marker(Forest.open(str(forest)).storage, layout.clusterer(name))
    return None if found is None else found[1]


def cluster(recipes: Recipes, scale: DiscoveryScale, forest: Path, k: int, seed: int) -> str:
    """Fit and assign set ``k<k>`` of ``forest`` on the pooled train text (both kept if done);
    the clusterer's sha256."""
    from elmcore import layout

    name, pooled = cluster_set(k), recipes.files((POOLED,), "train")
    sha = _clusterer_sha256(forest, name)
    if sha is None:
        elmtrain(
            "cluster-fit",
            "--forest",
            str(forest),
            "--set",
            name,
            "--data",
            *pooled,
            "--clusters",
            str(k),
            "--sample",
            str(scale.fit_sample),
            "--max-features",
            str(scale.max_features),
            "--seed",
            str(seed),
        )
        sha = _clusterer_sha256(forest, name)
        assert sha is not None, f"cluster-fit left no clusterer in {forest}"
    if not (forest / layout.cluster_assignment(name, 0)).is_file():
        elmtrain(
            "cluster-assign",
            "--forest",
            str(forest),
            "--set",
            name,
            "--data",
            *pooled,
            "--count",
            "1",
            "--index",
            "0",
            "--validation-fraction",
            str(scale.validation_fraction),
            "--sha256",
            sha,
        )
    return sha


def cluster_experts(
    recipes: Recipes, scale: DiscoveryScale, forest: Path, k: int, sha: str, seed: int
) -> None:
    """One expert ``c<i>`` per cluster, from the seed, on the cluster's own train and valid."""
    from elmcore import layout

    name = cluster_set(k)
    for i in range(k):
        train, valid = (forest / layout.cluster_data(name, i, s) for s in ("train", "valid"))
        if not any(valid.glob("*.jsonl")):
            raise RuntimeError(
                f"cluster {i} of {name} kept no validation documents: raise the scale's "
                f"validation_fraction ({scale.validation_fraction})"
            )
        recipes.branch(
            forest,
            f"c{i}",
            [str(train)],
            [str(valid)],
            scale.expert_steps(k),
            seed,
            extra=("--cluster", f"{name}:{i}:{sha}"),
        )


def train_seed(
    recipes: Recipes, scale: DiscoveryScale, template: Path, work: Path, seed: int
) -> SeedRun:
    btm, root = scale.btm, work / f"seed-{seed}"
    seeded = root / "seed"
    recipes.seed(template, seeded, (POOLED,), btm.seed_steps(btm.main_fraction), seed)
    labelled = root / "labelled"
    copy_forest(seeded, labelled)
    log.info("discovery.labelled", seed=seed, experts=len(scale.domains))
    recipes.experts(labelled, scale.domains, scale.expert_steps(len(scale.domains)), seed)
    clustered = {}
    for k in scale.cluster_counts:
        clustered[k] = root / cluster_set(k)
        copy_forest(seeded, clustered[k])
        log.info("discovery.clusters", seed=seed, k=k)
        sha = cluster(recipes, scale, clustered[k], k, seed)
        cluster_experts(recipes, scale, clustered[k], k, sha, seed)
    dense = root / "dense"
    recipes.dense(seeded, dense, (POOLED,), scale.half_budget, seed)
    return SeedRun(seed, seeded, labelled, dense, clustered)

"""c-BTM's clustering (issue 30, trainer side): fit on a bounded sample, balanced assignment,
the stored clusterer verified on load, and the commands ``cluster-fit``, ``cluster-assign`` and
``assign`` run as a Job's container would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score  # type: ignore[import-untyped]

from elmcore import layout
from elmcore.errors import BadInputError, IntegrityError
from elmcore.storage import open_storage
from elmcore.storage.base import sha256_file
from elmcore.storage.commit import read_marker
from elmtrain.cli import main
from elmtrain.clusters.fit import ClusterSettings, fit_clusterer
from elmtrain.clusters.partition import worker_documents
from elmtrain.clusters.sample import Reservoir
from elmtrain.clusters.store import load_clusterer, resolve_set, save_clusterer
from elmtrain.data.documents import iter_documents
from elmtrain.forest import Forest
from tests.conftest import elmtrain
from tests.textgen import domain_text, write_domains
from tests.trainer.conftest import ForestFactory

DOMAINS = ("cooking", "sailing", "finance")
RECOVERED = 0.9  # adjusted Rand index of clusters with the hidden domains (1.0: identical)


def labelled(sizes: dict[str, int]) -> tuple[list[str], list[int]]:
    documents, labels = [], []
    for number, (domain, count) in enumerate(sizes.items()):
        docs = domain_text(domain, count).split("\n\n\n")
        documents += docs
        labels += [number] * len(docs)
    return documents, labels


@pytest.mark.parametrize("balance", [False, True])
def test_fit_recovers_the_domains(balance: bool) -> None:
    documents, domains = labelled(dict.fromkeys(DOMAINS, 60))
    clusterer, labels = fit_clusterer(documents, ClusterSettings(clusters=3, balance=balance))
    assert adjusted_rand_score(domains, labels) >= RECOVERED
    # The sample's labels are the function every worker applies to any document.
    assert clusterer.assign(documents).tolist() == labels.tolist()


def test_balance_evens_out_unequal_domains() -> None:
    """Domains of 150, 50 and 100 documents: unbalanced, k-means follows them; balanced (c-BTM),
    no cluster holds more than ceil(n/k) of the sample, and the corpus splits evenly too."""
    documents, domains = labelled({"cooking": 150, "sailing": 50, "finance": 100})
    _, free_labels = fit_clusterer(documents, ClusterSettings(clusters=3, balance=False))
    assert sorted(np.bincount(free_labels).tolist()) == [50, 100, 150]
    assert adjusted_rand_score(domains, free_labels) >= RECOVERED
    balanced, labels = fit_clusterer(documents, ClusterSettings(clusters=3, balance=True))
    assert np.bincount(labels, minlength=3).max() <= 100
    corpus = np.bincount(balanced.assign(documents), minlength=3)
    assert corpus.max() / corpus.min() <= 1.1, corpus
    # The smallest domain stays whole: balancing moves documents at the big domains' edges.
    small = [label for label, domain in zip(labels, domains, strict=True) if domain == 1]
    assert len(set(small)) == 1


def test_reservoir_holds_at_most_its_size_of_a_uniform_sample() -> None:
    reservoir = Reservoir(50, seed=3).extend(str(n) for n in range(10_000))
    assert reservoir.seen == 10_000 and len(reservoir.kept) == 50
    assert len(set(reservoir.kept)) == 50
    # Uniform: the sample's mean is near the stream's (4999.5; sd of the mean about 408).
    assert abs(np.mean([int(d) for d in reservoir.kept]) - 4999.5) < 1600
    assert Reservoir(50).extend(["a", "b"]).kept == ["a", "b"]


def test_stored_clusterer_is_verified_on_load(tmp_path: Path) -> None:
    documents, _ = labelled(dict.fromkeys(DOMAINS, 20))
    clusterer, _ = fit_clusterer(documents, ClusterSettings(clusters=3))
    storage = open_storage(str(tmp_path / "forest"))
    sha = save_clusterer(storage, "web", clusterer)
    loaded, found = load_clusterer(storage, "web", sha)
    assert found == sha
    assert loaded.assign(documents).tolist() == clusterer.assign(documents).tolist()
    with pytest.raises(IntegrityError, match="not"):
        load_clusterer(storage, "web", "0" * 64)
    arrays = tmp_path / "forest" / layout.clusterer("web") / "clusterer.safetensors"
    data = bytearray(arrays.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the centres
    arrays.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_clusterer(storage, "web")
    with pytest.raises(BadInputError, match="no fitted clusterer"):
        load_clusterer(storage, "other")


def test_a_set_name_finds_its_one_version(tmp_path: Path) -> None:
    """``assign --set topics`` reads an ElmClusterSet's version (``topics-<digest8>``, its
    status.storageName) while it has one; with two it asks which."""
    documents, _ = labelled(dict.fromkeys(DOMAINS, 10))
    clusterer, _ = fit_clusterer(documents, ClusterSettings(clusters=3))
    storage = open_storage(str(tmp_path / "forest"))
    assert resolve_set(storage, "topics") == "topics"  # nothing yet: loading says so
    save_clusterer(storage, "topics-0123abcd", clusterer)
    save_clusterer(storage, "topics-extra-0123abcd", clusterer)  # another set's, not a version
    assert resolve_set(storage, "topics") == "topics-0123abcd"
    assert resolve_set(storage, "topics-0123abcd") == "topics-0123abcd"
    save_clusterer(storage, "topics-89abcdef", clusterer)
    with pytest.raises(BadInputError, match=r"2 versions .*storageName"):
        resolve_set(storage, "topics")


def test_commands_fit_assign_and_print(
    tmp_path: Path,
    tokenizer_forest: Path,
    forest_copy: ForestFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``cluster-fit`` on a pooled corpus from a sample smaller than it; two Indexed-Job workers
    that together write every document once, to the cluster ``assign`` prints for it, as
    JSON lines whose token shards a branch finds prepared."""
    corpus = write_domains(tmp_path / "corpus", list(DOMAINS), train_docs=40, valid_docs=2)
    data = [str(corpus / d / "train.txt") for d in DOMAINS]
    forest = str(forest_copy(tokenizer_forest, "forest"))
    common = ["--forest", forest, "--set", "web"]
    fitted = elmtrain("cluster-fit", *common, "--data", *data, "--clusters", "3",
                      "--sample", "90", "--ngram", "1,2")  # fmt: skip
    result = json.loads(fitted.stdout)
    assert result["documents_seen"] == 120 and result["documents_fitted"] == 90
    documents = list(iter_documents(data))
    capsys.readouterr()
    # In this process (the CLI's own entry point): a subprocess costs seconds of imports.
    assert main(["assign", *common, "--data", *data, "--sha256", result["sha256"]]) == 0
    labels = [int(line) for line in capsys.readouterr().out.splitlines()]
    clusterer, _ = load_clusterer(open_storage(forest), "web")
    assert labels == clusterer.assign(documents).tolist()
    assert adjusted_rand_score(np.repeat(range(3), 40), labels) >= RECOVERED

    written: dict[str, int] = {}
    tokenizer = Forest.open(forest).manifest().tokenizer
    assert tokenizer is not None
    worker = ["cluster-assign", *common, "--data", *data, "--count", "2"]
    worker += ["--validation-fraction", "0.1"]
    for index in (0, 1):
        if index == 0:  # as the Indexed Job runs it, tokenizing (torch, the tokenizer)
            out = elmtrain(*worker, env={"JOB_COMPLETION_INDEX": "0"}).stdout
        else:  # in this process, text only
            assert main([*worker, "--index", "1", "--no-tokenize"]) == 0
            out = capsys.readouterr().out
        record = json.loads(out)
        assert record["clusterer"] == result["sha256"]
        share = list(worker_documents(iter(documents), index, 2))
        assert sum(record["train"]) + sum(record["valid"]) == len(share)
        for key in record["files"]:
            cluster = int(key.split("/data/c")[1].split("/")[0])
            for line in (Path(forest) / key).read_text().splitlines():
                written[json.loads(line)["text"]] = cluster
            # Shards keyed as prepare keys them: a branch reading this file tokenizes nothing.
            shards = layout.token_shards(tokenizer.sha256, sha256_file(Path(forest) / key))
            assert (read_marker(open_storage(forest), shards) is not None) == (index == 0)
    assert written == {doc: label for doc, label in zip(documents, labels, strict=True)}
    assert len(written) == len(documents)  # every document once (the corpus has no duplicates)


def test_bad_input_exits_65_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forest = str(tmp_path / "forest")
    (tmp_path / "no-text.jsonl").write_text('{"body": "a recipe"}\n')
    (tmp_path / "blank.txt").write_text("\n\n\n\n")
    (tmp_path / "two.txt").write_text("one document\n\n\nanother one\n")
    cases = {
        "no-text.jsonl": "no-text.jsonl:1: expected {'text'",
        "blank.txt": "blank.txt: no text",
        "two.txt": "2 documents, fewer than 3 clusters",
    }
    fit = ["cluster-fit", "--forest", forest, "--set", "web", "--clusters", "3", "--data"]
    for name, message in cases.items():
        assert main([*fit, str(tmp_path / name)]) == 65
        stderr = capsys.readouterr().err
        assert message in stderr, stderr
    # One as a process, as a Job's container exits: status 65, one line naming the problem.
    completed = elmtrain("assign", "--forest", forest, "--set", "web",
                         "--data", str(tmp_path / "two.txt"), check=False)  # fmt: skip
    assert completed.returncode == 65, completed.stderr
    assert "elmtrain assign: error: cluster set 'web' has no fitted clusterer" in completed.stderr

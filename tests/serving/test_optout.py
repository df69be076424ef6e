"""Experts opted out (issue 28, point 5), through a real ``elmtrain serve`` and the official
client: per request (``elmforest.experts``: ``exclude`` or ``allow``) and per endpoint
(``--exclude-experts``). An excluded expert's weights never run (the forward-pass metric), the
posterior is renormalised over the others (scores equal the mixture of the allowed experts
with the prior restricted to them), and the answer says which experts could serve."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.serve import Served, serving
from tests.serving.conftest import NAME
from tests.serving.test_scoring import post

TOP_K = 2
SAILING = "The boat sailed across the bay with the wind in her sails"
OPT_OUT = {"elmforest": {"experts": {"exclude": ["sailing"]}}}


@pytest.fixture(scope="module")
def prior_text(corpus: Path) -> str:
    return str(corpus / "sailing" / "valid.txt")  # a prior that favours the excluded expert


@pytest.fixture(scope="module")
def served(
    expert_forest: Path, prior_text: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    with serving(
        str(expert_forest),
        tmp_path_factory.mktemp("optout-log"),
        *("--name", NAME, "--top-k", str(TOP_K), "--prior-data", prior_text),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def metric(served: Served, family: str, label: str) -> dict[str, float]:
    """The samples of a counter family by one label's value."""
    with urllib.request.urlopen(served.url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    for found in text_string_to_metric_families(text):
        if found.name == family:
            return {s.labels[label]: s.value for s in found.samples if s.name.endswith("_total")}
    return {}


def experts_of(answer: Any) -> dict[str, Any]:
    extra = answer.model_dump()["elmforest"]
    assert isinstance(extra, dict)
    return extra


def test_an_excluded_expert_never_runs(served: Served, client: openai.OpenAI) -> None:
    """Generation (whole and streamed), the average and scoring, all excluding sailing: the
    sailing expert's forward passes do not move while the others' do, and every answer says
    sailing was excluded; the same prompt without the opt-out is served by sailing."""
    plain = client.completions.create(model=NAME, prompt=SAILING, max_tokens=4, seed=1)
    assert "sailing" in {e["expert"] for e in experts_of(plain)["routing"][0]["experts"]}
    before = metric(served, "elmserve_model_forwards", "model")
    excluded_before = metric(served, "elmserve_expert_excluded", "expert").get("sailing", 0.0)

    answers = [
        client.completions.create(model=NAME, prompt=SAILING, max_tokens=6, extra_body=OPT_OUT),
        client.completions.create(
            model=f"{NAME}/average", prompt=SAILING, max_tokens=3, extra_body=OPT_OUT
        ),
        client.completions.create(
            model=NAME, prompt=SAILING, max_tokens=0, echo=True, logprobs=2, extra_body=OPT_OUT
        ),
    ]
    for answer in answers:
        experts = experts_of(answer)["experts"]
        assert experts == {"allowed": ["cooking", "finance"], "excluded": ["sailing"]}
    for routed in (
        experts_of(answers[0])["routing"][0]["experts"]
        + experts_of(answers[1])["routing"][0]["experts"]
    ):
        assert routed["expert"] in ("cooking", "finance")
    chunks = list(
        client.completions.create(
            model=NAME, prompt=SAILING, max_tokens=6, stream=True, extra_body=OPT_OUT
        )
    )
    streamed = [experts_of(c) for c in chunks if (c.model_extra or {}).get("elmforest")]
    assert streamed and streamed[0]["experts"]["excluded"] == ["sailing"]
    assert {e["expert"] for e in streamed[0]["routing"][0]["experts"]} <= {"cooking", "finance"}

    after = metric(served, "elmserve_model_forwards", "model")
    assert after.get("expert/sailing", 0.0) == before.get("expert/sailing", 0.0)
    for kept in ("expert/cooking", "expert/finance"):
        assert after[kept] > before.get(kept, 0.0), (kept, before, after)
    assert after["average"] > before.get("average", 0.0)
    excluded = metric(served, "elmserve_expert_excluded", "expert")["sailing"]
    assert excluded == excluded_before + 4


def test_allow_keeps_only_the_named_experts(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=NAME,
        prompt=SAILING,
        max_tokens=3,
        extra_body={"elmforest": {"experts": {"allow": ["finance"]}}},
    )
    extra = experts_of(answer)
    assert extra["experts"] == {"allowed": ["finance"], "excluded": ["cooking", "sailing"]}
    (only,) = extra["routing"][0]["experts"]  # top-2 of one expert: that one, all the weight
    assert only["expert"] == "finance" and only["weight"] == pytest.approx(1.0)


def test_scores_are_the_allowed_experts_mixture(
    served: Served, client: openai.OpenAI, expert_forest: Path, prior_text: str
) -> None:
    """Per token: the mixture of cooking and finance alone, by the stored prior restricted to
    them and renormalised (Bayes' rule over the allowed experts), as the paper's ensemble."""
    from elmcore.priors import PRIORS, StoredPrior
    from elmtrain.forest import Forest
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.evaluation import expert_logprobs
    from elmtrain.scoring.logprobs import ensemble_logprobs

    forest = Forest.open(str(expert_forest))
    manifest = forest.manifest()
    allowed = [e for e in manifest.sorted_experts() if e.domain != "sailing"]
    # The prior the server computed of sailing's text, over every expert (stored once).
    stored = [
        StoredPrior.model_validate_json(forest.storage.read_bytes(key))
        for key in forest.storage.list_keys(f"{PRIORS}/rev-{manifest.revision:08d}/")
    ]
    (prior,) = [
        p
        for p in stored
        if p.question.experts is None and p.question.data[0].location == prior_text
    ]
    weights = torch.tensor([prior.weights[e.domain] for e in allowed], dtype=torch.float64)
    assert prior.weights["sailing"] > max(weights.tolist())  # the opt-out removes the favourite

    answer = client.completions.create(
        model=NAME, prompt=SAILING, max_tokens=0, echo=True, logprobs=0, extra_body=OPT_OUT
    )
    status, tokenized = post(served, "/tokenize", {"prompt": SAILING, "add_special_tokens": False})
    assert status == 200
    ids = torch.tensor([tokenized["tokens"]])
    laws = expert_logprobs([forest.fetch(e) for e in allowed], ids, setup_runtime())
    expected = ensemble_logprobs(laws, weights / weights.sum(), TOP_K)[0]
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    everyone = client.completions.create(
        model=NAME, prompt=SAILING, max_tokens=0, echo=True, logprobs=0
    )
    full = everyone.choices[0].logprobs
    assert full is not None and full.token_logprobs is not None
    assert full.token_logprobs[1:] != pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    ("model", "experts"),
    [
        (NAME, {"exclude": ["sailing"], "allow": ["cooking"]}),  # not both
        (NAME, {"exclude": ["Sailing!"]}),  # not a domain name
        (NAME, {"allow": []}),  # an empty allow list allows nothing
        (NAME, {"allow": ["astronomy"]}),  # none of this forest's experts left
        (NAME, {"exclude": ["cooking", "sailing", "finance"]}),
        (f"{NAME}/average", {"allow": ["astronomy"]}),
        (f"{NAME}/expert/sailing", {"exclude": ["sailing"]}),  # the model asked for, excluded
        (NAME, {"excluded": ["sailing"]}),  # a misspelt field is not ignored
    ],
)
def test_bad_opt_outs_are_400s(served: Served, model: str, experts: dict[str, Any]) -> None:
    body = {"model": model, "prompt": SAILING, "max_tokens": 2, "elmforest": {"experts": experts}}
    status, answer = post(served, "/v1/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith("elmforest.experts"), error


def test_an_unknown_name_excludes_nothing(client: openai.OpenAI) -> None:
    """A data owner may opt out before the expert is merged: nothing to exclude yet."""
    answer = client.completions.create(
        model=NAME,
        prompt=SAILING,
        max_tokens=2,
        extra_body={"elmforest": {"experts": {"exclude": ["astronomy"]}}},
    )
    experts = experts_of(answer)["experts"]
    assert experts == {"allowed": ["cooking", "finance", "sailing"], "excluded": []}
    seed = client.completions.create(model=f"{NAME}/seed", prompt=SAILING, max_tokens=2)
    assert experts_of(seed)["experts"]["excluded"] == []


def test_an_endpoint_excludes_an_expert(expert_forest: Path, tmp_path: Path) -> None:
    """``--exclude-experts sailing``: never loaded (not listed, its model name unknown, no
    forward pass of it), the others serve; a bad name exits 65 naming the flag."""
    with serving(str(expert_forest), tmp_path, "--name", NAME, "--exclude-experts", "sailing") as s:
        status, models = s.get("/v1/models")
        assert status == 200
        names = [m["id"] for m in models["data"]]
        assert f"{NAME}/expert/sailing" not in names and f"{NAME}/expert/cooking" in names
        assert models["data"][0]["elmforest"]["excluded"] == ["sailing"]
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model=NAME, prompt=SAILING, max_tokens=4)
        extra = experts_of(answer)
        assert extra["experts"] == {"allowed": ["cooking", "finance"], "excluded": ["sailing"]}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=f"{NAME}/expert/sailing", prompt="x", max_tokens=1)
        forwards = metric(s, "elmserve_model_forwards", "model")
        assert "expert/sailing" not in forwards and forwards["expert/cooking"] > 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "elmtrain",
            "serve",
            "--forest",
            str(expert_forest),
            "--exclude-experts",
            "Sailing!",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 65, bad.stderr
    assert "--exclude-experts" in bad.stderr and "Sailing!" in bad.stderr

"""``elmtrain serve`` through the official ``openai`` client, as a user's code would call it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.serve import Served
from tests.serving.conftest import EXPERTS, NAME
from tests.textgen import domain_text

COOKING = domain_text("cooking", 1, seed=5)[:60]  # ~30 tokens of the 64-token context


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_ensemble_the_average_and_each_expert(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[0] == NAME
    assert set(ids) == {
        NAME,
        f"{NAME}/average",
        f"{NAME}/seed",
        *(f"{NAME}/expert/{d}" for d in EXPERTS),
    }


def test_a_completion_is_routed_to_the_prompts_experts(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=NAME, prompt=COOKING, max_tokens=12, temperature=0.8, seed=3
    )
    (choice,) = answer.choices
    assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
    assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    routing = (answer.model_extra or {})["elmforest"]
    (served,) = routing["routing"]
    experts = served["experts"]
    assert len(experts) == 2  # --top-k 2 (the default)
    assert experts[0]["weight"] + experts[1]["weight"] == pytest.approx(1, abs=1e-5)
    # A cooking prompt: the cooking expert is the most probable one.
    assert max(experts, key=lambda e: e["weight"])["expert"] == "cooking"
    assert routing["revision"] >= 1
    # The same seed draws the same text; another seed, in practice, another text.
    again = client.completions.create(
        model=NAME, prompt=COOKING, max_tokens=12, temperature=0.8, seed=3
    )
    assert again.choices[0].text == choice.text


def test_stop_sequences_end_the_text(client: openai.OpenAI) -> None:
    greedy = client.completions.create(
        model=f"{NAME}/expert/sailing", prompt="At dawn we raised the", max_tokens=30, temperature=0
    )
    text = greedy.choices[0].text
    assert greedy.choices[0].finish_reason == "length" and len(text) > 6
    stop = text[4:7]
    cut = client.completions.create(
        model=f"{NAME}/expert/sailing",
        prompt="At dawn we raised the",
        max_tokens=30,
        temperature=0,
        stop=[stop],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]


def test_streaming_gives_the_same_text_as_a_whole_answer(client: openai.OpenAI) -> None:
    kwargs = {"model": NAME, "prompt": COOKING, "max_tokens": 15, "temperature": 0}
    whole = client.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        client.completions.create(  # type: ignore[call-overload]
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert (chunks[0].model_extra or {})["elmforest"]["routing"][0]["experts"]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == whole.choices[0].finish_reason and not any(finished[:-1])
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_a_list_prompt_gives_one_choice_each(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=NAME, prompt=[COOKING, "O moon, thy silver"], max_tokens=5, seed=1
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert len(answer.model_extra["elmforest"]["routing"]) == 2  # type: ignore[index]


def test_the_average_and_single_models_answer(client: openai.OpenAI) -> None:
    for model in (f"{NAME}/average", f"{NAME}/seed", f"{NAME}/expert/finance"):
        answer = client.completions.create(model=model, prompt=COOKING, max_tokens=4)
        assert answer.model == model and answer.usage is not None
        # A sampled end of text may come first (a tiny model, and the threads' count changes
        # its weights in the last bits): "stop" then, with fewer tokens than asked for.
        reason, tokens = answer.choices[0].finish_reason, answer.usage.completion_tokens
        assert (reason, tokens) == ("length", 4) or (reason == "stop" and tokens < 4), answer
    average = client.completions.create(model=f"{NAME}/average", prompt=COOKING, max_tokens=2)
    weights = average.model_extra["elmforest"]["routing"][0]["experts"]  # type: ignore[index]
    assert sum(w["weight"] for w in weights) == pytest.approx(1)


def test_bad_requests_get_openai_errors(client: openai.OpenAI, server: Served) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=NAME, prompt="x", max_tokens=1000)
    assert long.value.code == "context_length_exceeded"
    # An oversize prompt is refused, not truncated.
    with pytest.raises(openai.BadRequestError) as oversize:
        client.completions.create(model=NAME, prompt=COOKING * 20, max_tokens=1)
    assert oversize.value.param == "prompt"
    for extra, param in (
        ({"bogus": 1}, "bogus"),
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"logprobs": 21}, "logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=NAME, prompt="x", extra_body=extra)
        assert refused.value.param == param, extra
    # Bodies the client would never send: the error shape is still OpenAI's.
    for body, status in ((b"{broken", 400), (b"[1, 2]", 400), (b"x" * (2 << 20), 413)):
        request = urllib.request.Request(server.url + "/v1/completions", data=body)
        with pytest.raises(urllib.error.HTTPError) as raw:
            urllib.request.urlopen(request, timeout=30)
        assert raw.value.code == status
        assert set(json.loads(raw.value.read())["error"]) == {"message", "type", "param", "code"}
    assert server.get("/healthz")[0] == 200
    assert server.get("/v1/nowhere")[0] == 404


def test_metrics_are_prometheus_families(client: openai.OpenAI, server: Served) -> None:
    client.completions.create(model=NAME, prompt=COOKING, max_tokens=3)
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    codes = {s.labels["code"] for s in families["elmserve_requests"].samples if "code" in s.labels}
    assert "200" in codes
    latency = families["elmserve_request_seconds"]
    assert latency.type == "histogram" and any(s.name.endswith("_bucket") for s in latency.samples)
    routed = {s.labels["expert"] for s in families["elmserve_expert_requests"].samples}
    assert "cooking" in routed
    revision = families["elmserve_manifest_revision"].samples[0].value
    assert revision == server.get("/readyz")[1]["revision"]
    assert families["elmserve_decode_batch_size"].type == "histogram"

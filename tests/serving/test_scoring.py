"""The scoring API (issue 28, point 1) through a real ``elmtrain serve`` and the official client:
token-id prompts, ``echo`` with ``max_tokens`` 0 or more, ``logprobs`` as OpenAI's legacy
completions define them, vLLM's tokenizer endpoints; the forest's log-probabilities are
``elmtrain ensemble-eval``'s; bad input is a 400 with OpenAI's error body."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from tests.conftest import elmtrain
from tests.harness.serve import Served, serving
from tests.serving.conftest import NAME

TOP_K = 2


def post(served: Served, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        served.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def prior_text(corpus: Path) -> str:
    return str(corpus / "cooking" / "valid.txt")


@pytest.fixture(scope="module")
def scorer(
    expert_forest: Path, prior_text: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The forest served with the cached prior of cooking's held-out text."""
    with serving(
        str(expert_forest),
        tmp_path_factory.mktemp("score-log"),
        "--name",
        NAME,
        "--top-k",
        str(TOP_K),
        "--prior-data",
        prior_text,
    ) as served:
        yield served


@pytest.fixture(scope="module")
def client(scorer: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=scorer.url + "/v1", api_key="unused", max_retries=0)


def context_length(served: Served) -> int:
    status, body = post(served, "/tokenize", {"prompt": "x"})
    assert status == 200
    return int(body["max_model_len"])


def test_forest_logprobs_are_ensemble_evals(
    scorer: Served, client: openai.OpenAI, expert_forest: Path, prior_text: str
) -> None:
    """The same windows of text, the same prior (cooking's held-out text, 64 windows), the same
    top-k: the server's per-token log-probabilities are ensemble-eval's, token for token."""
    from elmtrain.data.store import load_sequences
    from elmtrain.forest import Forest
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.evaluation import expert_logprobs
    from elmtrain.scoring.logprobs import ensemble_logprobs

    seq_len = context_length(scorer)
    data = str(Path(prior_text).with_name("train.txt"))
    report = json.loads(
        elmtrain(
            "ensemble-eval",
            "--forest",
            str(expert_forest),
            "--data",
            f"cooking={data}",
            "--seq-len",
            str(seq_len),
            "--max-sequences",
            "2",
            "--prior-data",
            f"cooking={prior_text}",
            "--prior-sample",
            "64",
            "--top-k",
            str(TOP_K),
        ).stdout
    )["domains"]["cooking"]
    forest = Forest.open(str(expert_forest))
    experts = forest.manifest().sorted_experts()
    sequences = load_sequences([data], forest.token_store(), seq_len, 2)
    # What ensemble-eval computes per token (its report has only their mean), by its functions.
    prior = torch.tensor([report["prior"][e.domain] for e in experts], dtype=torch.float64)
    runtime = setup_runtime()
    mixture = ensemble_logprobs(
        expert_logprobs([forest.fetch(e) for e in experts], sequences, runtime), prior, TOP_K
    )
    answer = client.completions.create(
        model=NAME, prompt=sequences.tolist(), echo=True, max_tokens=0, logprobs=1
    )
    served: list[float] = []
    for choice, expected in zip(answer.choices, mixture, strict=True):
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        first, *rest = choice.logprobs.token_logprobs
        assert first is None  # the first token has no context
        assert rest == pytest.approx(expected.tolist(), abs=1e-4)
        served += rest
    top = report[f"top{TOP_K}"]
    assert len(served) == top["tokens"] == 2 * (seq_len - 1)
    assert -sum(served) / len(served) == pytest.approx(top["loss"], abs=1e-5)


def test_logprobs_as_openai_defines_them(client: openai.OpenAI) -> None:
    """One expert scoring a text: the tokens spell it, offsets count its characters, the top
    tokens are sorted and include what greedy decoding picks; token ids score as the text."""
    model = f"{NAME}/expert/sailing"
    text = "The boat sailed across the bay"
    answer = client.completions.create(
        model=model, prompt=text, echo=True, max_tokens=0, logprobs=3
    )
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.text_offset
    assert logprobs.top_logprobs and logprobs.token_logprobs
    assert choice.text == text == "".join(logprobs.tokens)
    lengths = [len(t) for t in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for token, logprob, top in zip(
        logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True
    ):
        assert top is not None and logprob is not None and len(top) == 3
        assert logprob <= max(top.values()) + 1e-9
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        if token in top:
            assert top[token] == pytest.approx(logprob, abs=1e-6)

    ids = json.loads(json.dumps(answer.model_dump()))  # round trip as a client sees it
    assert ids["choices"][0]["logprobs"]["text_offset"] == logprobs.text_offset
    tokens = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True)
    assert tokens.choices[0].text == text
    # Greedy generation after the text picks the most probable next token: the score agrees.
    generated = client.completions.create(
        model=model, prompt=text, max_tokens=1, temperature=0, logprobs=5
    )
    g = generated.choices[0].logprobs
    assert g is not None and g.tokens and g.top_logprobs and g.top_logprobs[0]
    assert g.tokens == [generated.choices[0].text]
    assert g.text_offset == [len(text)]
    best = max(g.top_logprobs[0], key=lambda t: g.top_logprobs[0][t])
    assert g.tokens[0] == best


def test_token_id_prompts_score_as_text(scorer: Served, client: openai.OpenAI) -> None:
    text = "Whisk the eggs with sugar until pale"
    status, tokenized = post(scorer, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert status == 200 and tokenized["count"] == len(tokenized["tokens"])
    status, back = post(scorer, "/detokenize", {"tokens": tokenized["tokens"]})
    assert status == 200 and back == {"prompt": text}
    status, info = post_get(scorer, "/tokenizer_info")
    assert status == 200 and info["eos_token"] and info["model_max_length"] > 0
    by_text = client.completions.create(
        model=NAME, prompt=[text, text], echo=True, max_tokens=0, logprobs=2
    )
    by_ids = client.completions.create(
        model=NAME, prompt=tokenized["tokens"], echo=True, max_tokens=0, logprobs=2
    )
    a, b = by_text.choices[0].logprobs, by_ids.choices[0].logprobs
    assert a is not None and b is not None and a.token_logprobs and b.token_logprobs
    assert by_ids.choices[0].text == text and len(by_text.choices) == 2
    assert a.tokens == b.tokens
    assert a.token_logprobs[1:] == pytest.approx(b.token_logprobs[1:], abs=1e-6)
    # The prior (cooking's text) weighs sailing little: its law alone is another one.
    alone = client.completions.create(
        model=f"{NAME}/expert/sailing", prompt=text, echo=True, max_tokens=0, logprobs=0
    )
    c = alone.choices[0].logprobs
    assert c is not None and c.token_logprobs and c.top_logprobs
    assert c.token_logprobs[1:] != pytest.approx(a.token_logprobs[1:], abs=1e-6)
    assert c.top_logprobs[1] == {}


def post_get(served: Served, path: str) -> tuple[int, Any]:
    return served.get(path)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "logprobs": -1}, "logprobs"),
        ({"prompt": [5, 1 << 30], "echo": True, "max_tokens": 0}, "prompt"),
        ({"prompt": [[5, -3]], "echo": True, "max_tokens": 0}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, None),
        ({"prompt": "hi", "logprobs": 1, "stream": True}, None),
        ({"prompt": [], "echo": True}, "prompt"),
        ({"prompt": [[1]] * 33, "echo": True}, "prompt"),
    ],
)
def test_bad_scoring_requests_are_400s(
    scorer: Served, body: dict[str, Any], param: str | None
) -> None:
    status, answer = post(scorer, "/v1/completions", {"model": NAME, **body})
    assert status == 400
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert (error["param"] or "").startswith(param)


def test_too_long_token_prompts_are_refused(scorer: Served) -> None:
    limit = context_length(scorer)
    status, answer = post(
        scorer,
        "/v1/completions",
        {"model": NAME, "prompt": [5] * (limit + 1), "echo": True, "max_tokens": 0},
    )
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    status, answer = post(scorer, "/detokenize", {"tokens": [1 << 30]})
    assert status == 400 and answer["error"]["code"] == "invalid_token_id"

"""``elmtrain serve --api-key-file``: bearer keys through the ``openai`` client; probes and
metrics stay open; a bad key file fails at once, naming it."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import elmtrain
from tests.harness.serve import Served, serving
from tests.serving.conftest import NAME

KEYS = ("team-a-0123456789abcdef", "team-b-fedcba9876543210")


@pytest.fixture(scope="module")
def guarded(expert_forest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("keys")
    key_file = folder / "api-keys"
    key_file.write_text(f"{KEYS[0]}\n\n  {KEYS[1]}  \n")  # blank lines and padding ignored
    with serving(
        str(expert_forest), folder, "--name", NAME, "--api-key-file", str(key_file)
    ) as served:
        yield served


def _client(served: Served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_each_key_is_let_in(guarded: Served) -> None:
    for key in KEYS:
        answer = _client(guarded, key).completions.create(
            model=NAME, prompt="Stir the", max_tokens=3, temperature=0
        )
        assert answer.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("key", ["wrong-key", KEYS[0][:-1], KEYS[0] + "x", KEYS[1].upper()])
def test_a_wrong_key_is_a_401_with_openais_body(guarded: Served, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(guarded, key).completions.create(model=NAME, prompt="Stir", max_tokens=2)
    assert refused.value.status_code == 401
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error" and error["message"]
    assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")


def test_no_key_is_refused_everywhere_but_the_probes_and_metrics(guarded: Served) -> None:
    for path in ("/v1/models", "/tokenizer_info"):
        status, body = guarded.get(path)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", path
    basic = urllib.request.Request(
        guarded.url + "/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(basic, timeout=30)
    assert refused.value.code == 401
    for path in ("/healthz", "/readyz"):
        assert guarded.get(path)[0] == 200, path
    with urllib.request.urlopen(guarded.url + "/metrics", timeout=30) as metrics:
        assert metrics.status == 200 and b"elmserve_requests" in metrics.read()


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"\n \n", "no key"), (b"\xff\xfe", "not UTF-8"), (b"two keys on-one-line\n", "whitespace")],
)
def test_a_bad_key_file_fails_at_once_naming_it(
    expert_forest: Path, tmp_path: Path, content: bytes, says: str
) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_bytes(content)
    for path, reason in ((key_file, says), (tmp_path / "missing", "No such file")):
        done = elmtrain(
            "serve", "--forest", str(expert_forest), "--api-key-file", str(path), check=False
        )
        assert done.returncode == 65, done.stderr[-2000:]
        assert str(path) in done.stderr and reason in done.stderr, done.stderr[-2000:]

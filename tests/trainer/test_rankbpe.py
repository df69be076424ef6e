"""The rank-based encoder `elmtrain prepare` tokenizes with gives the fast tokenizer's ids
exactly, is refused for tokenizers it cannot reproduce, and is dropped where it would differ."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer, Tokenizer

from elmtrain.data.rankbpe import rank_encoder
from elmtrain.data.tokenworker import DocumentEncoder
from tests.textgen import domain_text

EOS = "<|endoftext|>"
# Training text that makes merges across words, digits, punctuation, whitespace runs and
# several scripts, so random text meets many of them.
TRAINING = [
    domain_text("cooking", 40),
    domain_text("finance", 40),
    "naïve café Ωμέγα добрый день 東京 42 3.14 don't we'll it's I'm\t\ttabs  two  spaces\n\n",
]


def trained(**options: object) -> str:
    bpe = ByteLevelBPETokenizer(**options)  # type: ignore[arg-type]
    bpe.train_from_iterator(TRAINING, vocab_size=600, special_tokens=[EOS], show_progress=False)
    return str(bpe._tokenizer.to_str())


@pytest.fixture(scope="module")
def byte_level() -> str:
    return trained()


def fast_ids(tokenizer_json: str, text: str) -> list[int]:
    return list(Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids)


TEXT = st.text(
    st.one_of(
        st.sampled_from(list(" \t\n'sdmtlvre0123456789.,!?-_()ΩμέγαдобрыйéïÉ東京\u0301\u00a0")),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(TEXT, max_size=4))
def test_the_ids_are_the_fast_tokenizers_on_any_text(byte_level: str, parts: list[str]) -> None:
    text = EOS.join(parts)  # the end-of-text token inside a document is matched as HF does
    encoder, how = rank_encoder(byte_level)
    assert encoder is not None, how
    assert encoder.encode(text) == fast_ids(byte_level, text)


def test_training_text_and_an_nfc_normalizer_agree_too(byte_level: str) -> None:
    nfc = trained(unicode_normalizer="nfc")  # GPT-NeoX's tokenizer normalizes NFC
    text = "".join(TRAINING) + "cafe\u0301 e\u0301te\u0301 " + EOS + " Ångström"
    for tokenizer_json in (byte_level, nfc):
        encoder, how = rank_encoder(tokenizer_json)
        assert encoder is not None, how
        assert encoder.encode(text) == fast_ids(tokenizer_json, text)


def test_tokenizers_it_cannot_reproduce_are_refused(byte_level: str) -> None:
    lower = trained(lowercase=True)
    assert rank_encoder(lower)[0] is None
    assert "normalizer" in rank_encoder(lower)[1]
    prefixed = trained(add_prefix_space=True)
    assert rank_encoder(prefixed)[0] is None
    spec = json.loads(byte_level)
    spec["model"]["vocab"]["Ġsaltpepper"] = len(spec["model"]["vocab"])  # no merge makes it
    assert rank_encoder(json.dumps(spec)) == (None, "vocabulary ids do not follow the merges")
    spec = json.loads(byte_level)
    spec["model"]["merges"][3:5] = spec["model"]["merges"][4:2:-1]  # ids out of merge order
    assert rank_encoder(json.dumps(spec))[0] is None
    spec = json.loads(byte_level)
    spec["model"]["dropout"] = 0.1
    assert rank_encoder(json.dumps(spec)) == (None, "BPE dropout")


def test_a_difference_on_the_first_batch_returns_to_the_fast_tokenizer(byte_level: str) -> None:
    encoder = DocumentEncoder(byte_level)
    assert encoder.ranked is not None
    right = DocumentEncoder(byte_level).encode(["salt and pepper", "oven"], 0, "uint16")

    class Wrong:
        def encode(self, text: str) -> list[int]:
            return [1] * len(text)

    encoder.ranked = Wrong()  # type: ignore[assignment]
    first = encoder.encode(["salt and pepper", "oven"], 0, "uint16")
    np.testing.assert_array_equal(first, right)
    assert encoder.ranked is None and "differed" in encoder.how
    fast = [Tokenizer.from_str(byte_level).encode("oven", add_special_tokens=False).ids]
    np.testing.assert_array_equal(encoder.encode(["oven"], 0, "uint16"), [*fast[0], 0])

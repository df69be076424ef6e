"""Forests started from pretrained HF folders: tiny random GPT-2, GPT-NeoX (Pythia-style padded
vocabulary, fp16 weights) and Llama (bf16 weights, a SentencePiece-style tokenizer) models made
with ``transformers``, a tokenizer imported with ``--from``, an expert branched and trained from
each; models whose logits are not a plain projection are refused before any step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CohereConfig,
    Gemma2Config,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from elmcore.errors import BadInputError, ExitCode
from elmtrain.model.families import check_trainable
from tests.conftest import elmtrain, training
from tests.textgen import domain_text

WIDTH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def tokenizer_folder(out: Path, style: str) -> PreTrainedTokenizerFast:
    texts = [domain_text(d, 40) for d in ("cooking", "sailing")]
    if style == "sentencepiece":  # Llama's: metaspace words, </s> to end
        spm = SentencePieceBPETokenizer()
        spm.train_from_iterator(texts, vocab_size=300, special_tokens=["<unk>", "</s>"])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=spm, eos_token="</s>", unk_token="<unk>"
        )
    else:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(out)
    return tokenizer


def config_for(family: str, vocab: int, eos: int) -> PretrainedConfig:
    ids: dict[str, Any] = {"bos_token_id": eos, "eos_token_id": eos}
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids)
    if family == "gpt_neox":  # Pythia pads its vocabulary to a multiple of 128
        padded = -(-vocab // 128) * 128
        return GPTNeoXConfig(
            vocab_size=padded, intermediate_size=64, max_position_embeddings=64, **WIDTH, **ids
        )
    shared = {"vocab_size": vocab, "intermediate_size": 64, "num_key_value_heads": 1, **WIDTH}
    if family == "llama":
        return LlamaConfig(max_position_embeddings=64, **shared, **ids)
    if family == "gemma2":
        return Gemma2Config(head_dim=16, **shared, **ids)
    return CohereConfig(**shared, **ids)


def hf_folders(root: Path, family: str, dtype: torch.dtype, style: str) -> None:
    """``root/hf-tokenizer`` and ``root/hf-model``: what a user downloaded."""
    tokenizer = tokenizer_folder(root / "hf-tokenizer", style)
    config = config_for(family, len(tokenizer), int(tokenizer.eos_token_id))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(root / "hf-model")


def pretrained_forest(root: Path, family: str, dtype: torch.dtype, style: str) -> Path:
    """A forest whose tokenizer and seed are the folders a user downloaded."""
    hf_folders(root, family, dtype, style)
    forest = root / "forest"
    elmtrain("tokenizer", "--forest", str(forest), "--from", str(root / "hf-tokenizer"), "--merge")
    return forest


CASES = [
    ("gpt2", torch.float32, "byte-level"),
    ("gpt_neox", torch.float16, "byte-level"),
    ("llama", torch.bfloat16, "sentencepiece"),
]


@pytest.mark.parametrize(("family", "dtype", "style"), CASES, ids=[c[0] for c in CASES])
def test_experts_train_from_a_pretrained_folder(
    tmp_path: Path, corpus: Path, family: str, dtype: torch.dtype, style: str
) -> None:
    forest = pretrained_forest(tmp_path, family, dtype, style)
    stored = json.loads((tmp_path / "hf-model" / "config.json").read_text())
    assert stored["dtype"] == str(dtype).removeprefix("torch.")
    elmtrain("seed", "--forest", str(forest), "--pretrained", str(tmp_path / "hf-model"),
             "--steps", "0", "--merge")  # fmt: skip
    cooking = corpus / "cooking"
    elmtrain("branch", "--forest", str(forest), "--domain", "cooking",
             "--data", str(cooking / "train.txt"), "--val-data", str(cooking / "valid.txt"),
             "--training", training(steps=20, seq_len=32, learning_rate=1e-2),
             "--merge")  # fmt: skip

    expert = forest / "experts" / "cooking" / "v1"
    metrics = json.loads((expert / "metrics.json").read_text())
    assert metrics["val_ppl_after"] < metrics["val_ppl_before"]
    model = AutoModelForCausalLM.from_pretrained(expert)
    assert model.config.model_type == family
    assert model.config.vocab_size == stored["vocab_size"]  # a padded vocabulary stays padded
    seed = AutoModelForCausalLM.from_pretrained(forest / "seed")
    moved = max(
        float((a.float() - b.float()).abs().max())
        for a, b in zip(model.state_dict().values(), seed.state_dict().values(), strict=True)
    )
    assert moved > 1e-4, "the expert is its pretrained seed, untrained"
    # Exports load as they are: the expert's folder and `elmtrain average`'s carry the
    # tokenizer, and both give the user's own tokenizer's ids.
    elmtrain("average", "--forest", str(forest), "--out", str(tmp_path / "average"))
    text = "salt and pepper, then simmer"
    own = AutoTokenizer.from_pretrained(tmp_path / "hf-tokenizer")(text)["input_ids"]
    for folder in (expert, tmp_path / "average"):
        assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == own
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert loaded(torch.tensor([own])).logits.shape[-1] == stored["vocab_size"]


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_models_that_transform_their_logits_are_refused(tmp_path: Path, family: str) -> None:
    forest = pretrained_forest(tmp_path, family, torch.float32, "byte-level")
    refused = elmtrain("seed", "--forest", str(forest), "--pretrained",
                       str(tmp_path / "hf-model"), "--steps", "0", check=False)  # fmt: skip
    assert refused.returncode == ExitCode.BAD_INPUT, refused.stderr[-2000:]
    field = "final_logit_softcapping" if family == "gemma2" else "logit_scale"
    assert field in refused.stderr and "does not train this model" in refused.stderr
    assert not (forest / "seed").exists()


def test_a_loss_the_config_does_not_announce_is_caught_by_comparing() -> None:
    class Scaled(GPT2LMHeadModel):  # logits scaled in forward, nothing in the config
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            labels = kwargs.pop("labels", None)
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            if labels is not None:
                out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
            return out

    config = GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    check_trainable(GPT2LMHeadModel(config), "plain")  # the same loss: accepted
    with pytest.raises(BadInputError, match="differs from a plain output projection"):
        check_trainable(Scaled(config), "scaled")


def test_the_folders_may_be_in_s3(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    hf_folders(tmp_path, "gpt_neox", torch.bfloat16, "byte-level")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for path in [*tmp_path.glob("hf-*/*")]:
        client.upload_file(str(path), s3_bucket, f"hf/{path.parent.name}/{path.name}")
    forest, env = str(tmp_path / "forest"), {"ELMFOREST_S3_ENDPOINT": s3_endpoint}
    elmtrain("tokenizer", "--forest", forest, "--from", f"s3://{s3_bucket}/hf/hf-tokenizer",
             "--merge", env=env)  # fmt: skip
    elmtrain("seed", "--forest", forest, "--pretrained", f"s3://{s3_bucket}/hf/hf-model",
             "--steps", "0", "--merge", env=env)  # fmt: skip
    seed = AutoModelForCausalLM.from_pretrained(tmp_path / "forest" / "seed")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "forest" / "tokenizer")
    assert seed.config.vocab_size == original.config.vocab_size > len(tokenizer)  # padded
    for name, tensor in original.state_dict().items():
        assert torch.equal(seed.state_dict()[name], tensor), name  # imported as they were

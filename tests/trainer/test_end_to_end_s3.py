"""The whole BTM pipeline through a real S3 protocol server (moto) on loopback:
tokenizer -> seed -> two branches with posterior init -> ensemble-eval and average."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import elmtrain, train_seed, train_tokenizer, training

DOMAINS = ("cooking", "sailing", "finance", "poetry")


def upload_corpus(endpoint: str, bucket: str, corpus: Path) -> str:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in corpus.rglob("*.txt"):
        client.upload_file(str(path), bucket, f"data/{path.relative_to(corpus).as_posix()}")
    return f"s3://{bucket}/data"


@pytest.mark.slow
def test_btm_pipeline_over_s3(
    s3_endpoint: str, s3_bucket: str, corpus: Path, tmp_path: Path
) -> None:
    data = upload_corpus(s3_endpoint, s3_bucket, corpus)
    forest = f"s3://{s3_bucket}/forests/demo"
    common = ["--forest", forest, "--s3-endpoint", s3_endpoint]
    env = {"ELMFOREST_S3_ENDPOINT": s3_endpoint}  # data locations use the same server

    # The tokenizer and seed reach S3 through ELMFOREST_S3_ENDPOINT, like the data.
    train_tokenizer(forest, [data], env)
    train_seed(forest, [f"{data}/{d}/train.txt" for d in DOMAINS], steps=40, env=env)
    for domain in ("cooking", "sailing"):
        elmtrain(
            "branch",
            *common,
            "--domain",
            domain,
            "--init",
            "posterior",
            "--data",
            f"{data}/{domain}/train.txt",
            "--val-data",
            f"{data}/{domain}/valid.txt",
            "--training",
            training(steps=40),
            "--merge",
            env=env,
        )

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    manifest = json.loads(
        client.get_object(Bucket=s3_bucket, Key="forests/demo/manifest.json")["Body"].read()
    )
    assert sorted(manifest["experts"]) == ["cooking", "sailing"]
    assert manifest["experts"]["cooking"]["parents"] == [
        {"kind": "seed", "domain": None, "version": None, "weight": 1.0}
    ]  # the first branch starts from the seed
    sailing_parents = manifest["experts"]["sailing"]["parents"]
    assert [p["domain"] for p in sailing_parents] == ["cooking"]  # posterior over {cooking}

    # Each expert beats the seed on its own domain.
    valid = [f"{d}={data}/{d}/valid.txt" for d in ("cooking", "sailing")]

    def ppl(model: str) -> dict[str, float]:
        out = elmtrain(
            "eval", *common, "--model", model, "--data", *valid, "--seq-len", "64", env=env
        ).stdout
        return {d: v["perplexity"] for d, v in json.loads(out)["domains"].items()}

    seed_ppl = ppl("seed")
    for domain in ("cooking", "sailing"):
        assert ppl(f"expert:{domain}")[domain] < seed_ppl[domain]

    report = json.loads(
        elmtrain(
            "ensemble-eval",
            *common,
            "--data",
            *valid,
            "--seq-len",
            "64",
            "--top-k",
            "1",
            "2",
            "--prior-data",
            *[f"{d}={data}/{d}/train.txt" for d in ("cooking", "sailing")],
            "--out",
            f"s3://{s3_bucket}/reports/ensemble.json",
            env=env,
        ).stdout
    )
    for domain in ("cooking", "sailing"):
        entry = report["domains"][domain]
        assert entry["full"]["perplexity"] == pytest.approx(entry["top2"]["perplexity"])
        assert entry["full"]["perplexity"] < seed_ppl[domain]
        assert max(entry["prior"], key=entry["prior"].get) == domain

    average = json.loads(
        elmtrain(
            "average",
            *common,
            "--weights",
            "posterior",
            "--target-data",
            f"{data}/cooking/valid.txt",
            "--seq-len",
            "64",
            "--out",
            f"s3://{s3_bucket}/exports/cooking-avg",
            env=env,
        ).stdout
    )
    assert average["weights"]["cooking"] > 0.5

    # Every expert and the export load with plain transformers; the tokenizer with AutoTokenizer.
    for key in (
        "forests/demo/experts/cooking/v1",
        "forests/demo/experts/sailing/v1",
        "exports/cooking-avg",
        "forests/demo/tokenizer",
    ):
        local = tmp_path / key
        for item in client.list_objects_v2(Bucket=s3_bucket, Prefix=key + "/")["Contents"]:
            target = local / item["Key"].rsplit("/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(s3_bucket, item["Key"], str(target))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "forests/demo/tokenizer")
    ids = tokenizer("Whisk the butter", return_tensors="pt")["input_ids"]
    for key in ("forests/demo/experts/cooking/v1", "exports/cooking-avg"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / key)
        assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)

    text = elmtrain(
        "generate", *common, "--ensemble", "--prompt", "Whisk the", "--max-new-tokens", "8", env=env
    ).stdout
    assert text.startswith("Whisk the")
    # Routed: every expert reads the prompt once, then only the most probable one generates.
    routed = elmtrain(
        "generate",
        *common,
        "--ensemble",
        "--top-k-experts",
        "1",
        "--prompt",
        "Whisk the",
        "--max-new-tokens",
        "8",
        env=env,
    )
    assert routed.stdout.startswith("Whisk the")
    assert '"experts": ["' in routed.stderr and "generate.routed" in routed.stderr

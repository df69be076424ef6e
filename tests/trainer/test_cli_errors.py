"""Bad input exits 65 with one clear line; transient faults exit 75 (documented codes)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from elmcore.errors import ExitCode
from tests.conftest import elmtrain
from tests.trainer.conftest import ForestFactory, training


def assert_fails(expected: ExitCode, match: str, *args: str, **env: str) -> None:
    completed = elmtrain(*args, check=False, env=env)
    assert completed.returncode == expected, completed.stderr[-2000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"elmtrain {args[0]}: "), last
    assert match in last, last


def test_missing_data_is_bad_input(seeded_forest: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_fails(
        ExitCode.BAD_INPUT,
        "no text files",
        "branch",
        "--forest",
        str(seeded_forest),
        "--domain",
        "cooking",
        "--data",
        str(tmp_path / "empty"),
    )


def test_unknown_expert_is_bad_input(seeded_forest: Path, corpus: Path) -> None:
    assert_fails(
        ExitCode.BAD_INPUT,
        "no expert 'nope'",
        "eval",
        "--forest",
        str(seeded_forest),
        "--model",
        "expert:nope",
        "--data",
        str(corpus / "cooking" / "valid.txt"),
    )


def test_wrong_architecture_is_bad_input(
    seeded_forest: Path, tokenizer_forest: Path, corpus: Path, forest_copy: ForestFactory
) -> None:
    # Pretrained weights whose vocabulary does not match the forest's tokenizer.
    other = forest_copy(tokenizer_forest, "other")
    config = json.loads((seeded_forest / "seed" / "config.json").read_text())
    config["vocab_size"] = 999
    pretrained = other / "pretrained"
    pretrained.mkdir()
    (pretrained / "config.json").write_text(json.dumps(config))
    (pretrained / "model.safetensors").write_bytes(
        (seeded_forest / "seed" / "model.safetensors").read_bytes()
    )
    assert_fails(
        ExitCode.BAD_INPUT,
        "model",
        "seed",
        "--forest",
        str(other),
        "--pretrained",
        str(pretrained),
        "--steps",
        "0",
    )


def test_invalid_domain_and_config_are_bad_input(seeded_forest: Path, corpus: Path) -> None:
    data = str(corpus / "cooking" / "train.txt")
    assert_fails(
        ExitCode.BAD_INPUT,
        "DNS-1123",
        "branch",
        "--forest",
        str(seeded_forest),
        "--domain",
        "../etc",
        "--data",
        data,
    )
    assert_fails(
        ExitCode.BAD_INPUT,
        "learning_rate",
        "branch",
        "--forest",
        str(seeded_forest),
        "--domain",
        "cooking",
        "--data",
        data,
        "--training",
        '{"learning_rate": -1}',
    )
    assert_fails(
        ExitCode.BAD_INPUT,
        "no tokenizer yet",
        "seed",
        "--forest",
        str(seeded_forest) + "-none",
        "--data",
        data,
        "--training",
        training(),
    )


def test_unreachable_storage_is_transient(corpus: Path) -> None:
    assert_fails(
        ExitCode.TRANSIENT,
        "transient",
        "eval",
        "--forest",
        "s3://no-such/forest",
        "--s3-endpoint",
        "http://127.0.0.1:9",
        "--data",
        str(corpus / "poetry"),
        ELMFOREST_S3_MAX_ATTEMPTS="2",
    )


@pytest.mark.parametrize("argv", [["seed"], ["branch", "--forest", "x"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert elmtrain(*argv, check=False).returncode == ExitCode.USAGE


def test_routing_needs_an_ensemble_and_a_prompt(seeded_forest: Path) -> None:
    forest = ("--forest", str(seeded_forest))
    assert_fails(
        ExitCode.BAD_INPUT,
        "--top-k-experts needs --ensemble",
        "generate",
        *forest,
        "--model",
        "seed",
        "--top-k-experts",
        "1",
    )
    assert_fails(
        ExitCode.BAD_INPUT,
        "exceed the context",
        "generate",
        *forest,
        "--model",
        "seed",
        "--max-new-tokens",
        "500",
    )


# Every kind of unusable text, as a file's bytes; each must exit 65 naming the file, at once.
UNUSABLE = {
    "empty.txt": b"",
    "blank.txt": b"\n\n   \n\n\n  \n",
    "latin1.txt": "caf\u00e9 au lait\n".encode("latin-1"),
    "not-gzip.txt.gz": b"not gzip at all",
    "truncated.txt.gz": gzip.compress(b"some text " * 100)[:30],
    "broken.jsonl": b'{"text": "ok"}\n{"text": \n',
    "no-text-key.jsonl": b'{"content": "x"}\n',
    "null-text.jsonl": b'{"text": null}\n',
    "blank-records.jsonl": b'{"text": "   "}\n\n{"text": ""}\n',
}


@pytest.mark.parametrize("name", sorted(UNUSABLE))
def test_unusable_training_text_is_bad_input(
    seeded_forest: Path, forest_copy: ForestFactory, tmp_path: Path, name: str
) -> None:
    forest = forest_copy(seeded_forest, "forest")
    path = tmp_path / name
    path.write_bytes(UNUSABLE[name])
    assert_fails(
        ExitCode.BAD_INPUT,
        name,
        "branch",
        "--forest",
        str(forest),
        "--domain",
        "cooking",
        "--data",
        str(path),
        "--training",
        training(steps=2),
    )
    # The run's progress says why, for the operator (a Job's failure only says "exit 65").
    progress = json.loads((forest / "runs" / "branch.cooking.v1" / "progress.json").read_text())
    assert progress["phase"] == "failed" and name in progress["message"], progress


def test_missing_training_file_is_bad_input(seeded_forest: Path, tmp_path: Path) -> None:
    assert_fails(
        ExitCode.BAD_INPUT,
        "absent.txt",
        "branch",
        "--forest",
        str(seeded_forest),
        "--domain",
        "cooking",
        "--data",
        str(tmp_path / "absent.txt"),
    )


def test_empty_validation_and_tokenizer_text_are_bad_input(
    seeded_forest: Path, corpus: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_fails(
        ExitCode.BAD_INPUT,
        "empty.txt",
        "branch",
        "--forest",
        str(seeded_forest),
        "--domain",
        "cooking",
        "--data",
        str(corpus / "cooking" / "train.txt"),
        "--val-data",
        str(empty),
        "--training",
        training(steps=2),
    )
    assert_fails(
        ExitCode.BAD_INPUT,
        "empty.txt",
        "tokenizer",
        "--forest",
        str(tmp_path / "forest"),
        "--data",
        str(empty),
        "--vocab-size",
        "300",
    )


def test_windows_longer_than_the_context_are_bad_input(seeded_forest: Path, corpus: Path) -> None:
    # The tiny model reads 64 tokens; eval's default --seq-len is 128.
    data = f"cooking={corpus / 'cooking' / 'valid.txt'}"
    assert_fails(
        ExitCode.BAD_INPUT, "exceed the model's context (64)",
        "eval", "--forest", str(seeded_forest), "--data", data,
    )  # fmt: skip

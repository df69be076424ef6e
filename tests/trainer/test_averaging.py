"""Streaming parameter averaging: exact weighted sums, memory independent of input count and
tensor size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from elmcore.errors import BadInputError
from elmtrain.config import ModelConfig
from elmtrain.model.averaging import average_files, average_models
from elmtrain.model.families import build_model, save_model
from tests.conftest import ROOT


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_explicit_weights_equal_the_weighted_sum(tmp_path: Path, family: str) -> None:
    config = ModelConfig.model_validate(
        {"family": family, "d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 32}
    )
    dirs = []
    for seed in range(3):
        directory = tmp_path / f"m{seed}"
        save_model(build_model(config, vocab_size=64, eos_id=0, seed=seed), directory)
        dirs.append(directory)
    weights = [0.5, 0.3, 0.2]
    average_models(dirs, weights, tmp_path / "avg")
    inputs = [load_file(d / "model.safetensors") for d in dirs]
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    assert averaged.keys() == inputs[0].keys()
    for name, tensor in averaged.items():
        expected = sum(w * t[name] for w, t in zip(weights, inputs, strict=True))
        assert torch.allclose(tensor, expected, atol=1e-6), name  # type: ignore[arg-type]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "avg")
    assert model.config.model_type == family


def test_mixed_dtypes_and_integer_buffers(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        path = tmp_path / f"{i}.safetensors"
        save_file(
            {
                "w": torch.full((4,), float(i), dtype=torch.bfloat16),
                "ids": torch.arange(3),
                "e": torch.zeros(0),
            },
            path,
        )
        paths.append(path)
    average_files(paths, [0.25, 0.75], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.full((4,), 0.75, dtype=torch.bfloat16))
    assert torch.equal(out["ids"], torch.arange(3))


def test_mismatched_inputs_are_bad_input(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(5)}, tmp_path / "b.safetensors")
    with pytest.raises(BadInputError, match="differ"):
        average_files(
            [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
            [0.5, 0.5],
            tmp_path / "o.safetensors",
        )


PEAK_RSS = """
import sys
from pathlib import Path
from elmtrain.model.averaging import average_files
from safetensors.torch import load_file
from tests.harness.peakrss import peak_growth_kib

paths = [Path(p) for p in sys.argv[3:]]

def stream():
    average_files(paths, [1 / len(paths)] * len(paths), Path(sys.argv[2]))

def naive():  # the naive way, to show this measurement does see whole-model loading
    tensors = [load_file(p) for p in paths]
    for t in tensors:
        t["big"].sum()

print(peak_growth_kib(stream if sys.argv[1] == "stream" else naive))
"""


def _peak_growth_kib(out: Path, inputs: list[Path], mode: str = "stream") -> int:
    completed = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, mode, str(out), *map(str, inputs)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return int(completed.stdout.strip())


def test_peak_memory_is_bounded_by_slices_not_tensors_or_inputs(tmp_path: Path) -> None:
    big = 4_000_000  # 16 MB of fp32: the largest tensor
    inputs = []
    for i in range(8):
        path = tmp_path / f"in{i}.safetensors"
        save_file({"big": torch.full((big,), float(i)), "small": torch.ones(1000) * i}, path)
        inputs.append(path)
    largest_kib = big * 4 // 1024
    two = _peak_growth_kib(tmp_path / "o2.safetensors", inputs[:2])
    eight = _peak_growth_kib(tmp_path / "o8.safetensors", inputs)
    naive = _peak_growth_kib(tmp_path / "unused", inputs, mode="naive")
    assert naive > 6 * largest_kib, naive  # the probe sees whole-model loading
    # Loading everything would grow by 8 x 16 MB; streaming holds a few 4 MB slices.
    assert eight < largest_kib, (two, eight, largest_kib)
    assert eight - two < largest_kib, (two, eight, largest_kib)
    out = load_file(tmp_path / "o8.safetensors")
    assert torch.allclose(out["big"][:3], torch.full((3,), 3.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_sums_round_like_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    """numpy does the arithmetic; the result must be what torch's float32 sum rounds to."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3000, generator=generator).to(dtype) for _ in range(3)]
    tensors[0][:3] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
    paths = []
    for i, tensor in enumerate(tensors):
        save_file({"w": tensor}, tmp_path / f"{i}.safetensors")
        paths.append(tmp_path / f"{i}.safetensors")
    weights = [0.2, 0.3, 0.5]
    average_files(paths, weights, tmp_path / "out.safetensors")
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    expected = sum(w * t.to(accumulate) for w, t in zip(weights, tensors, strict=True))
    got = load_file(tmp_path / "out.safetensors")["w"]
    assert got.dtype == dtype
    assert torch.allclose(got, expected.to(dtype), rtol=0, atol=0, equal_nan=True)  # type: ignore[union-attr]


def test_averaging_imports_neither_torch_nor_transformers() -> None:
    """``elmtrain average`` starts in a fraction of a second: only its own command is imported,
    and a plain average needs numpy alone (bench/merge measures what this buys)."""
    probe = (
        "import sys; from elmtrain.cli import build_parser; build_parser('average'); "
        "import elmtrain.model.averaging; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"


def test_sharded_folders_average_into_shards_that_transformers_loads(tmp_path: Path) -> None:
    """Inputs sharded (as large models come) or not; the output is sharded like the first,
    with its index and tokenizer files, and equals the weighted sum."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from elmtrain.model.files import INDEX_FILE, WEIGHTS_FILE

    config = ModelConfig.model_validate(
        {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 32}
    )
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["salt pepper onion garlic"] * 20, vocab_size=300)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    dirs, models = [], []
    for seed in range(3):
        model = build_model(config, vocab_size=len(tokenizer), eos_id=0, seed=seed)
        directory = tmp_path / f"m{seed}"
        # Two sharded inputs and one single file.
        model.save_pretrained(directory, max_shard_size="40KB" if seed < 2 else "1GB")
        dirs.append(directory)
        models.append(model.state_dict())
    tokenizer.save_pretrained(dirs[0])
    assert (dirs[0] / INDEX_FILE).is_file() and not (dirs[2] / INDEX_FILE).exists()
    weights = [0.5, 0.3, 0.2]
    average_models(dirs, weights, tmp_path / "avg")

    out = tmp_path / "avg"
    assert not (out / WEIGHTS_FILE).exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in dirs[0].glob("*.safetensors")
    )
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in loaded.items():
        expected = sum(w * m[name] for w, m in zip(weights, models, strict=True))
        assert torch.allclose(tensor, expected, atol=1e-6), name
    assert (
        AutoTokenizer.from_pretrained(out)("salt pepper")["input_ids"]
        == tokenizer("salt pepper")["input_ids"]
    )


def test_an_index_naming_a_missing_shard_is_bad_input(tmp_path: Path) -> None:
    config = ModelConfig.model_validate(
        {"family": "gpt2", "d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 32}
    )
    build_model(config, vocab_size=64, eos_id=0, seed=0).save_pretrained(
        tmp_path / "m", max_shard_size="40KB"
    )
    next((tmp_path / "m").glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(BadInputError, match="missing shard"):
        average_models([tmp_path / "m", tmp_path / "m"], [0.5, 0.5], tmp_path / "avg")

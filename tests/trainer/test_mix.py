"""``elmtrain mix`` (Branch-Train-MiX): Llama experts as one Mixtral model that transformers
loads; exact where a mixture must reduce to one expert, and routed by centroids on domain text."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM, PreTrainedModel

from elmcore import layout
from elmcore.errors import BadInputError, ExitCode
from elmcore.manifest import merge_result
from elmcore.records import Lineage, Result, SourceFile
from elmcore.storage import open_storage
from elmcore.storage.commit import commit_dir
from elmcore.storage.manifest_store import update_manifest
from elmtrain.config import ModelConfig
from elmtrain.forest import Forest
from elmtrain.mix.build import write_mix
from elmtrain.mix.plan import check_mixable, expert_name, mixtral_config
from elmtrain.mix.router import centroid_router, random_router
from elmtrain.model.families import build_model, load_model, save_model
from tests.conftest import ROOT, elmtrain

DOMAINS = ("cooking", "finance", "sailing")  # the manifest's order: slots 0, 1, 2
LLAMA = {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 64}


def windows(tokenizer: object, text: str, length: int = 64) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"]  # type: ignore[operator]
    usable = len(ids) // length * length
    return torch.tensor(ids[:usable]).view(-1, length)


def train(model: PreTrainedModel, data: torch.Tensor, steps: int = 12) -> None:
    """A few AdamW steps on the domain's windows: enough to make the branches differ."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (8,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def add_expert(forest: Path, domain: str, model: PreTrainedModel, valid: Path | None) -> None:
    """Commit ``model`` as the forest's expert for ``domain`` and merge it, with its
    validation text in its lineage as branch training records it."""
    folder = forest.parent / f"{forest.name}-{domain}"
    save_model(model, folder)
    storage = open_storage(str(forest))
    key = layout.expert(domain, 1)
    sha = commit_dir(storage, folder, key)
    val = []
    if valid is not None:
        digest = hashlib.sha256(valid.read_bytes()).hexdigest()
        val = [SourceFile(location=str(valid), size=valid.stat().st_size, sha256=digest)]
    result = Result(
        run_id=f"branch-{domain}",
        kind="expert",
        path=key,
        sha256=sha,
        domain=domain,
        version=1,
        lineage=Lineage(val_data=val),
    )
    update_manifest(storage, lambda manifest: merge_result(manifest, result))


@pytest.fixture(scope="module")
def llama_forest(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_forest: Path, corpus: Path
) -> Path:
    """Three Llama experts branched from one seed, each trained briefly on its domain."""
    forest = tmp_path_factory.mktemp("mix") / "llama"
    shutil.copytree(tokenizer_forest, forest)
    tokenizer = Forest.open(str(forest)).tokenizer()
    config = ModelConfig.model_validate(LLAMA)
    seed = build_model(config, vocab_size=len(tokenizer), eos_id=0, seed=0)
    for domain in DOMAINS:
        expert = build_model(config, vocab_size=len(tokenizer), eos_id=0, seed=0)
        expert.load_state_dict(seed.state_dict())
        train(expert, windows(tokenizer, (corpus / domain / "train.txt").read_text()))
        add_expert(forest, domain, expert, corpus / domain / "valid.txt")
    return forest


def expert_dirs(forest: Path) -> list[Path]:
    f = Forest.open(str(forest))
    return [f.fetch(f.manifest().expert(d)) for d in DOMAINS]


def test_pure_plan_names_and_config() -> None:
    name = "model.layers.3.mlp.gate_proj.weight"
    assert expert_name(name, 2) == "model.layers.3.block_sparse_moe.experts.2.w1.weight"
    assert expert_name("model.layers.3.mlp.down_proj.weight", 0).endswith("experts.0.w2.weight")  # type: ignore[union-attr]
    assert expert_name("model.layers.3.self_attn.q_proj.weight", 0) is None
    dense = {
        "model_type": "llama",
        "hidden_size": 32,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
    }
    mixed = mixtral_config(dense, 3, 2)
    assert (mixed["model_type"], mixed["num_local_experts"], mixed["num_experts_per_tok"]) == (
        "mixtral",
        3,
        2,
    )
    # Mixtral's own defaults (eps 1e-5, theta 1e6) would change every layer's output.
    assert mixed["rms_norm_eps"] == 1e-6 and mixed["rope_parameters"]["rope_theta"] == 5e5
    for family in ("gpt2", "gpt_neox"):
        with pytest.raises(BadInputError, match=r"cannot be mixed.*llama"):
            check_mixable({"model_type": family}, "x")
    # Each row is a unit vector, and each expert's own mean picks that expert, although the
    # means share a large common part.
    means = np.random.default_rng(0).normal(size=(3, 2, 8)) + 5.0
    rows = centroid_router(means)
    assert rows.shape == (2, 3, 8)
    assert np.allclose(np.linalg.norm(rows, axis=2), 1.0, atol=1e-6)
    logits = np.einsum("lrh,elh->ler", rows, means)  # layer, whose mean, which row
    assert (logits.argmax(axis=2) == [[0, 1, 2]] * 2).all()


def test_one_expert_mix_gives_its_logits(llama_forest: Path, tmp_path: Path) -> None:
    [directory, *_] = expert_dirs(llama_forest)
    write_mix([directory], [1.0], random_router(2, 1, 32, seed=0), 1, tmp_path / "mix")
    mixed = AutoModelForCausalLM.from_pretrained(tmp_path / "mix", dtype=torch.float32).eval()
    dense = load_model(directory)
    assert isinstance(mixed, MixtralForCausalLM)
    ids = torch.randint(
        0, int(dense.config.vocab_size), (2, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.allclose(mixed(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)


class ForcedRouter(torch.nn.Module):
    """Mixtral's router contract (logits, weights, indices) with every token sent to one expert."""

    def __init__(self, experts: int, chosen: int) -> None:
        super().__init__()
        self.experts, self.chosen = experts, chosen

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        logits = torch.zeros(tokens, self.experts)
        logits[:, self.chosen] = 1.0
        return logits, torch.ones(tokens, 1), torch.full((tokens, 1), self.chosen)


def recorder(seen: list[tuple[torch.Tensor, torch.Tensor]]) -> object:
    """A forward hook keeping each call's (input, output)."""

    def record(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append((inputs[0], output))

    return record


def test_forced_router_gives_that_experts_ffn(llama_forest: Path, tmp_path: Path) -> None:
    dirs = expert_dirs(llama_forest)
    write_mix(dirs, [1.0] * 3, random_router(2, 3, 32, seed=0), 1, tmp_path / "mix")
    mixed = AutoModelForCausalLM.from_pretrained(tmp_path / "mix", dtype=torch.float32).eval()
    ids = torch.randint(
        0, int(mixed.config.vocab_size), (2, 40), generator=torch.Generator().manual_seed(2)
    )
    first_layer = []
    for slot, directory in enumerate(dirs):
        dense = load_model(directory)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in mixed.model.layers:
            layer.mlp.gate = ForcedRouter(3, slot)
        hooks = [layer.mlp.register_forward_hook(recorder(seen)) for layer in mixed.model.layers]
        with torch.no_grad():
            mixed(input_ids=ids)
            for (inputs, output), own in zip(seen, dense.model.layers, strict=True):
                assert torch.allclose(output, own.mlp(inputs), atol=1e-5)
        for hook in hooks:
            hook.remove()
        assert len(seen) == 2
        first_layer.append(seen[0])
    # The first layer's input is the same whichever expert runs (shared embeddings), and the
    # branches' feed-forward layers differ: the test would see a wrong slot.
    assert torch.equal(first_layer[0][0], first_layer[1][0])
    assert not torch.allclose(first_layer[0][1], first_layer[1][1], atol=1e-3)


def own_expert_share(folder: Path, corpus: Path) -> float:
    """How often a layer's router ranks a token's own domain's expert first, over every layer
    and every token of each domain's validation text."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hits = total = 0
    for slot, domain in enumerate(DOMAINS):
        ids = windows(tokenizer, (corpus / domain / "valid.txt").read_text())[:16]
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        for layer in logits:
            hits += int((layer.argmax(dim=-1) == slot).sum())
            total += layer.shape[0]
    return hits / total


def test_cli_mix_loads_generates_and_centroids_route_by_domain(
    llama_forest: Path, corpus: Path, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    out = tmp_path / "moe"
    report = json.loads(
        elmtrain(
            "mix",
            "--forest",
            str(llama_forest),
            "--out",
            str(out),
            "--router",
            "centroids",
            "--average",
            "posterior",
            "--sample",
            "16",
            "--seq-len",
            "64",
        ).stdout
    )
    lineage = json.loads((out / "mix.json").read_text())
    assert lineage == {k: v for k, v in report.items() if k not in ("out", "sha256")}
    assert [(e["domain"], e["version"], e["slot"]) for e in lineage["experts"]] == [
        (d, 1, i) for i, d in enumerate(DOMAINS)
    ]
    # Posterior weights: the forest's stored prior of the experts' validation text, and the
    # shared tensors are averaged with them.
    [stored] = (llama_forest / "priors").rglob("*.json")
    prior = json.loads(stored.read_text())["weights"]
    weights = [e["weight"] for e in lineage["experts"]]
    assert weights == pytest.approx([prior[d] for d in DOMAINS])
    assert (lineage["average"], lineage["router"], lineage["top_k"], lineage["family"]) == (
        "posterior",
        "centroids",
        2,
        "llama",
    )
    name = "model.embed_tokens.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    mixed = load_file(out / index[name])[name]
    experts = [load_file(d / "model.safetensors")[name] for d in expert_dirs(llama_forest)]
    expected = sum(w * t for w, t in zip(weights, experts, strict=True))
    assert torch.allclose(mixed, expected, atol=1e-6)  # type: ignore[arg-type]

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, MixtralForCausalLM)
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (3, 2)
    prompt = tokenizer("salt and pepper", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6

    write_mix(
        expert_dirs(llama_forest),
        [1.0] * 3,
        random_router(2, 3, 32, seed=0),
        2,
        tmp_path / "random",
    )
    shutil.copy(out / "tokenizer.json", tmp_path / "random")
    shutil.copy(out / "tokenizer_config.json", tmp_path / "random")
    centroids, random = own_expert_share(out, corpus), own_expert_share(tmp_path / "random", corpus)
    record_property("own_expert_share", {"centroids": centroids, "random": random})
    print(f"own-domain expert ranked first: centroids {centroids:.3f}, random {random:.3f}")
    assert centroids > random


def test_gpt2_forest_is_refused(tokenizer_forest: Path, tmp_path: Path) -> None:
    forest = tmp_path / "gpt2"
    shutil.copytree(tokenizer_forest, forest)
    config = ModelConfig.model_validate({**LLAMA, "family": "gpt2"})
    add_expert(forest, "cooking", build_model(config, vocab_size=320, eos_id=0, seed=0), None)
    completed = elmtrain("mix", "--forest", str(forest), "--out", str(tmp_path / "o"), check=False)
    assert completed.returncode == ExitCode.BAD_INPUT, completed.stderr[-2000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("elmtrain mix: error: expert cooking v1: a gpt2 model cannot be mixed")
    assert "llama" in last
    assert not (tmp_path / "o").exists()


PEAK_RSS = """
import json, sys
from pathlib import Path
import numpy as np
from elmtrain.mix.build import write_mix
from tests.harness.peakrss import peak_growth_kib

dirs = [Path(p) for p in sys.argv[2:]]
routers = np.zeros((1, len(dirs), 64), np.float32)
growth = peak_growth_kib(lambda: write_mix(dirs, [1.0] * len(dirs), routers, 2, Path(sys.argv[1])))
print(json.dumps({"growth_kib": growth, "torch": "torch" in sys.modules}))
"""


def test_mixing_streams_without_torch(tmp_path: Path) -> None:
    """Three experts of 24 MB of feed-forward weights each (8 MB tensors): building the mix
    grows the process by less than one of those tensors, and imports no torch."""
    from safetensors.numpy import load_file, save_file

    hidden, inner = 64, 32768
    dense = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inner,
             "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 256}  # fmt: skip
    dirs = []
    for i in range(3):
        directory = tmp_path / f"e{i}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(dense))
        tensors = {
            "model.embed_tokens.weight": np.full((256, hidden), i, np.float32),
            "model.layers.0.mlp.gate_proj.weight": np.full((inner, hidden), i, np.float32),
            "model.layers.0.mlp.up_proj.weight": np.full((inner, hidden), i + 10, np.float32),
            "model.layers.0.mlp.down_proj.weight": np.full((hidden, inner), i + 20, np.float32),
        }
        save_file(tensors, str(directory / "model.safetensors"))
        dirs.append(directory)
    out = tmp_path / "mix"
    completed = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(out), *map(str, dirs)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    tensor_kib = inner * hidden * 4 // 1024
    print(f"mix build: {found['growth_kib']} KiB growth; one MLP tensor is {tensor_kib} KiB")
    assert found["growth_kib"] < tensor_kib, found
    assert found["torch"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = load_file(str(out / index["model.layers.0.block_sparse_moe.experts.2.w3.weight"]))
    assert (shard["model.layers.0.block_sparse_moe.experts.2.w3.weight"] == 12).all()
    shared = load_file(str(out / index["model.embed_tokens.weight"]))
    assert np.allclose(shared["model.embed_tokens.weight"], 1.0)  # (0 + 1 + 2) / 3

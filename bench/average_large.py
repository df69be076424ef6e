"""Averaging and the posterior over experts larger than half this machine's memory (issue 27.4).

    python -m bench.average_large           # two bf16 Llama experts, each > MemAvailable / 2
    python -m bench.average_large --quick   # two small ones (seconds): the same path

The experts are sized from ``MemAvailable`` at start, so that holding two of them (or one and
the output) could not fit: a run that finishes proves the average streams. It measures the
peak RSS of the process that averages (``average_models``, what ``elmtrain average`` and a
branch's averaged init call) against one expert's bytes, and checks some output tensors
against ``w1 * a + w2 * b`` computed here. Then it scores a token sample under both experts as a
posterior branch's prior does (``domain_prior``: one expert loaded at a time, in its stored
bf16) and measures that process's peak RSS too. Disk: three models (two experts and the output).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import parser, run_measured, table, write_results

HIDDEN, FFN, VOCAB, HEADS = 4096, 11008, 32000, 32  # Llama-2 7B's shapes
QUICK = {"hidden": 256, "ffn": 688, "vocab": 4096, "heads": 4, "layers": 2}
WEIGHTS = (0.7, 0.3)
TOLERANCE = 1e-3  # a few bf16 steps at these weights' scale (0.02): rounding, not a bug


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


Shapes = dict[str, list[tuple[str, tuple[int, ...]]]]


def shapes(hidden: int, ffn: int, vocab: int, layers: int) -> Shapes:
    """Shard file -> its tensors, one file per layer (as an HF sharded checkpoint)."""
    files: Shapes = {"model-emb.safetensors": [("model.embed_tokens.weight", (vocab, hidden))]}
    for i in range(layers):
        p = f"model.layers.{i}."
        files[f"model-{i:05d}.safetensors"] = [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (ffn, hidden)),
            (p + "mlp.up_proj.weight", (ffn, hidden)),
            (p + "mlp.down_proj.weight", (hidden, ffn)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    files["model-head.safetensors"] = [
        ("model.norm.weight", (hidden,)),
        ("lm_head.weight", (vocab, hidden)),
    ]
    return files


def write_expert(folder: Path, size: dict[str, int], seed: int) -> int:
    """A bf16 Llama folder of random weights, one shard in memory at a time; its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": size["hidden"], "intermediate_size": size["ffn"],
        "num_attention_heads": size["heads"], "num_key_value_heads": size["heads"],
        "num_hidden_layers": size["layers"], "vocab_size": size["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    files = shapes(size["hidden"], size["ffn"], size["vocab"], size["layers"])
    for file, tensors in files.items():
        shard = {
            name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            for name, shape in tensors
        }
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def sized(available: int, quick: bool) -> dict[str, int]:
    """7B-shaped layers, as many as make one expert larger than half of ``available``."""
    if quick:
        return QUICK
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    layers = math.ceil((0.55 * available - fixed) / per_layer)
    return {"hidden": HIDDEN, "ffn": FFN, "vocab": VOCAB, "heads": HEADS, "layers": layers}


AVERAGE = """
import sys
from pathlib import Path
from elmtrain.model.averaging import average_models
a, b, out = (Path(p) for p in sys.argv[1:4])
average_models([a, b], [float(sys.argv[4]), float(sys.argv[5])], out)
"""


POSTERIOR = """
import json
import sys
from pathlib import Path
import torch
from elmtrain.runtime import Runtime
from elmtrain.scoring.evaluation import domain_prior
a, b = Path(sys.argv[1]), Path(sys.argv[2])
sample = torch.randint(0, int(sys.argv[3]), (4, 64), generator=torch.Generator().manual_seed(0))
print(json.dumps(domain_prior([a, b], sample, Runtime(torch.device("cpu")))))
"""


def check(a: Path, b: Path, out: Path, names: list[tuple[str, str]]) -> float:
    """The largest |out - (w1 a + w2 b)| over ``names`` (file, tensor)."""
    import torch
    from safetensors import safe_open

    worst = 0.0
    for file, name in names:
        tensors = []
        for folder in (a, b, out):
            with safe_open(str(folder / file), "pt") as handle:
                tensors.append(handle.get_tensor(name).float())
        expected = (WEIGHTS[0] * tensors[0] + WEIGHTS[1] * tensors[1]).to(torch.bfloat16).float()
        worst = max(worst, float((tensors[2] - expected).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    available = mem_available()
    size = sized(available, args.quick)
    work = Path(tempfile.mkdtemp(prefix="bench-average-large-"))
    try:
        experts = [work / "a", work / "b"]
        expert_bytes = [write_expert(folder, size, seed) for seed, folder in enumerate(experts)]
        out = work / "average"
        measured = run_measured(
            [
                sys.executable,
                "-c",
                AVERAGE,
                str(experts[0]),
                str(experts[1]),
                str(out),
                str(WEIGHTS[0]),
                str(WEIGHTS[1]),
            ]
        )
        posterior = run_measured(
            [sys.executable, "-c", POSTERIOR, str(experts[0]), str(experts[1]), str(size["vocab"])]
        )
        prior = [float(p) for p in json.loads(posterior.stdout.strip().splitlines()[-1])]
        files = shapes(size["hidden"], size["ffn"], size["vocab"], size["layers"])
        sample = [(f, tensors[0][0]) for f, tensors in list(files.items())[:2]]
        sample.append(("model-head.safetensors", "lm_head.weight"))
        worst = check(experts[0], experts[1], out, sample)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = 1 << 30
    results: dict[str, Any] = {
        "mem_available_gib": round(available / gib, 2),
        "layers": size["layers"],
        "expert_gib": round(expert_bytes[0] / gib, 2),
        "two_experts_over_available": round(2 * expert_bytes[0] / available, 2),
        "average_seconds": round(measured.seconds, 1),
        "average_peak_rss_gib": round(measured.peak_rss_mb / 1024, 3),
        "peak_over_one_expert": round(measured.peak_rss_mb * (1 << 20) / expert_bytes[0], 3),
        "max_abs_error": worst,
        "posterior_prior": [round(p, 4) for p in prior],
        "posterior_seconds": round(posterior.seconds, 1),
        "posterior_peak_rss_gib": round(posterior.peak_rss_mb / 1024, 3),
        "posterior_peak_over_one_expert": round(
            posterior.peak_rss_mb * (1 << 20) / expert_bytes[0], 3
        ),
    }
    prior_ok = len(prior) == 2 and abs(sum(prior) - 1) < 1e-6 and all(0 <= p <= 1 for p in prior)
    print(table(["figure", "value"], [[k, v] for k, v in results.items()]))
    print(f"results: {write_results('average_large', results, args)}")
    return 0 if worst < TOLERANCE and prior_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

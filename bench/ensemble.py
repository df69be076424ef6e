"""Ensemble cost: per-token cost of the routed top-2 ensemble of 8 experts against one model.

    python -m bench.ensemble            # GPT-2 4x256 experts, 256-token sequences (~3 min)
    python -m bench.ensemble --quick    # tiny experts (< 30 s)

Scoring: one model's ``token_logprobs`` over a batch of sequences, against the routed top-2
ensemble (``route`` picks two experts from the cached prior, only they run, and their
posterior mixture is computed) and, for reference, the top-2 that keeps the two most probable
experts at every position (all 8 run). Generation: tokens/s of ``elmtrain generate``'s
key/value-cached streams, one model against the top-2 routed by the prompt (reading the prompt
with all 8 experts to route is a one-off cost per prompt, reported apart).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import parser, plot_path, table, write_results

FULL = {
    "model": {"d_model": 256, "n_layers": 4, "n_heads": 4},
    "vocab": 8192,
    "experts": 8,
    "sequences": 32,
    "seq_len": 256,
    "new_tokens": 64,
    "repeats": 5,
}
QUICK = {
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2},
    "vocab": 1024,
    "experts": 8,
    "sequences": 8,
    "seq_len": 64,
    "new_tokens": 16,
    "repeats": 2,
}


def _best_of(repeats: int, work: Any) -> float:
    """The median of ``repeats`` timings after one warm-up call."""
    work()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def measure(scale: dict[str, Any]) -> dict[str, Any]:
    import torch

    from elmtrain.config import ModelConfig
    from elmtrain.model.families import build_model
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.logprobs import ensemble_logprobs, log_posterior, route, token_logprobs
    from elmtrain.scoring.streams import ContextStream

    runtime = setup_runtime()
    config = ModelConfig(
        family="gpt2", context_length=scale["seq_len"] + scale["new_tokens"], **scale["model"]
    )
    experts = [
        build_model(config, scale["vocab"], 0, seed).eval() for seed in range(scale["experts"])
    ]
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(
        0, scale["vocab"], (scale["sequences"], scale["seq_len"]), generator=generator
    )
    prior = torch.softmax(
        torch.randn(scale["experts"], generator=generator, dtype=torch.float64), 0
    )
    tokens = sequences[:, 1:].numel()

    def one() -> None:
        token_logprobs(experts[0], sequences, runtime)

    def routed() -> None:
        chosen = route(prior, 2)
        logprobs = torch.stack([token_logprobs(experts[j], sequences, runtime) for j in chosen])
        ensemble_logprobs(logprobs, prior[chosen])

    def every_expert() -> None:
        logprobs = torch.stack([token_logprobs(e, sequences, runtime) for e in experts])
        ensemble_logprobs(logprobs, prior, 2)

    scoring = {
        name: _best_of(scale["repeats"], work) / tokens * 1e6
        for name, work in (
            ("one model", one),
            ("routed top-2", routed),
            ("top-2 of all 8", every_expert),
        )
    }

    prompt = sequences[0, : scale["seq_len"] // 2].tolist()

    @torch.no_grad()
    def generate(models: list[Any]) -> tuple[float, float]:
        """(seconds reading the prompt and routing, seconds per generated token)."""
        started = time.perf_counter()
        streams = [ContextStream(m, prompt, runtime.device) for m in models]
        if len(models) > 2:  # route on the prompt, as ``elmtrain generate --top-k-experts 2``
            loglik = torch.tensor([s.context_loglik for s in streams])
            keep = route(log_posterior(loglik, torch.ones(len(streams))).exp(), 2)
            streams = [streams[i] for i in keep]
        prompt_seconds, started = time.perf_counter() - started, time.perf_counter()
        for step in range(scale["new_tokens"]):
            token = int(sequences[1, step])  # the same tokens for both: cost, not sampling
            for stream in streams:
                stream.advance(token)
        return prompt_seconds, (time.perf_counter() - started) / scale["new_tokens"]

    generate(experts)  # warm-up
    single = [generate(experts[:1]) for _ in range(scale["repeats"])]
    routed_runs = [generate(experts) for _ in range(scale["repeats"])]
    per_token = {
        "one model": statistics.median(t for _, t in single) * 1e3,
        "routed top-2": statistics.median(t for _, t in routed_runs) * 1e3,
    }
    prompt_ms = {
        "one model": statistics.median(p for p, _ in single) * 1e3,
        "routed top-2": statistics.median(p for p, _ in routed_runs) * 1e3,
    }
    return {
        "scoring_us_per_token": scoring,
        "scoring_ratio": scoring["routed top-2"] / scoring["one model"],
        "all_experts_ratio": scoring["top-2 of all 8"] / scoring["one model"],
        "generation_ms_per_token": per_token,
        "generation_ratio": per_token["routed top-2"] / per_token["one model"],
        "prompt_ms": prompt_ms,  # once per prompt: every expert reads it to route
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    scoring = results["scoring_us_per_token"]
    left.bar(list(scoring), list(scoring.values()), color=["C0", "C1", "C3"])
    left.set_ylabel("µs per scored token")
    left.set_title("scoring")
    generation = results["generation_ms_per_token"]
    right.bar(list(generation), list(generation.values()), color=["C0", "C1"])
    right.set_ylabel("ms per generated token")
    right.set_title("generation (key/value cache)")
    figure.suptitle("ensemble of 8 experts: cost against one model")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    scale = QUICK if args.quick else FULL
    results = {"scale": scale, **measure(scale)}
    path = write_results("ensemble", results, args)
    plot(results, plot_path("ensemble", args))
    print(
        table(
            ["measure", "one model", "routed top-2", "ratio", "top-2 of all 8 (ratio)"],
            [
                [
                    "scoring µs/token",
                    results["scoring_us_per_token"]["one model"],
                    results["scoring_us_per_token"]["routed top-2"],
                    results["scoring_ratio"],
                    results["all_experts_ratio"],
                ],
                [
                    "generation ms/token",
                    results["generation_ms_per_token"]["one model"],
                    results["generation_ms_per_token"]["routed top-2"],
                    results["generation_ratio"],
                    "-",
                ],
            ],
        )
    )
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()

"""How big a BTM quality run is: domains, model, compute budget, seeds, evaluation sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scale:
    first: tuple[str, ...]  # the parallel stage: branched from the seed
    new: tuple[str, ...]  # the incremental stage: branched from the first stage's experts
    held_out: tuple[str, ...]  # training domains nobody trains on: out-of-domain sets
    ood: str  # the corpus' own evaluation-only domain
    model: dict[str, Any]
    vocab_size: int
    batch_size: int
    seq_len: int
    total_steps: int  # one forest's compute: seed + every expert, in optimizer steps
    main_fraction: float  # the seed's share of total_steps in the main comparison
    fractions: tuple[float, ...]  # the seed-fraction sweep (training seed 0)
    training_seeds: tuple[int, ...]  # replicates of the main comparison
    domain_counts: tuple[int, ...]  # forests over the first n of ``count_order``
    count_order: tuple[str, ...]  # training domains of the domain-count study, in order
    max_bytes: int | None  # per text file: the quick run reads a prefix
    eval_sequences: int
    prior_sequences: int
    curve_points: int = 10  # validations per incremental expert (its learning curve)
    curve_batches: int = 4  # validation batches behind each point of a learning curve
    top_k: int = 2
    strategies: tuple[str, ...] = field(default=("posterior", "seed", "nearest", "uniform"))

    @property
    def trained(self) -> tuple[str, ...]:
        return (*self.first, *self.new)

    @property
    def out_of_domain(self) -> tuple[str, ...]:
        return (*self.held_out, self.ood)

    @property
    def evaluated(self) -> tuple[str, ...]:
        return (*self.trained, *self.out_of_domain)

    def seed_steps(self, fraction: float) -> int:
        return round(fraction * self.total_steps)

    def expert_steps(self, fraction: float, experts: int) -> int:
        """Each of ``experts`` experts' share of what the seed leaves of the budget."""
        return (self.total_steps - self.seed_steps(fraction)) // experts


FULL = Scale(
    first=("changelogs", "code", "legal", "scripture"),
    new=("manuals", "dictionary"),
    held_out=("perldocs", "quotes"),
    ood="devil",
    model={"family": "gpt2", "d_model": 96, "n_layers": 3, "n_heads": 4, "context_length": 128},
    vocab_size=2048,
    batch_size=16,
    seq_len=128,
    total_steps=2400,
    main_fraction=0.5,
    fractions=(0.1, 0.3, 0.5, 0.7, 0.9),
    training_seeds=(0, 1, 2),
    domain_counts=(2, 4, 8),
    count_order=(
        "code",
        "scripture",
        "legal",
        "dictionary",
        "changelogs",
        "quotes",
        "manuals",
        "perldocs",
    ),
    max_bytes=None,
    eval_sequences=128,
    prior_sequences=32,
)
QUICK = Scale(
    first=("code", "legal"),
    new=("scripture",),
    held_out=("quotes",),
    ood="devil",
    model={"family": "gpt2", "d_model": 32, "n_layers": 1, "n_heads": 2, "context_length": 64},
    vocab_size=512,
    batch_size=8,
    seq_len=64,
    total_steps=60,
    main_fraction=0.5,
    fractions=(0.5, 0.8),
    training_seeds=(0, 1),
    domain_counts=(2, 4),
    count_order=("code", "legal", "scripture", "quotes"),
    max_bytes=200_000,
    eval_sequences=16,
    prior_sequences=8,
    curve_points=3,
    curve_batches=2,
)

"""The forest report's contract: what to evaluate (request) and the perplexity table (report).

``elmforest`` writes the request, ``elmtrain report`` computes the table, ``elmforest`` renders
it; both sides read these models, so the JSON between them has one definition.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from elmcore.names import Domain

SEED = "seed"
ENSEMBLE = "ensemble"
AVERAGE_POSTERIOR = "average-posterior"
AVERAGE_UNIFORM = "average-uniform"
MOE_UNTRAINED = "moe-untrained"  # the manifest's mix (spec.mix) before its finetuning
MOE = "moe"  # the manifest's mix, finetuned: what <forest>/moe serves


def expert_row(domain: str) -> str:
    return f"expert:{domain}"


def top_k_row(k: int) -> str:
    return f"ensemble-top{k}"


class EvalSet(BaseModel):
    """One column of the table: a domain's evaluation text, and held-out text for its prior."""

    model_config = ConfigDict(extra="forbid")

    domain: Domain
    data: list[str] = Field(min_length=1, max_length=64)
    prior_data: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="text for the cached prior P(D=j); empty: a uniform prior",
    )


class ReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sets: list[EvalSet] = Field(min_length=1, max_length=256)
    top_k: int | None = Field(2, ge=1, description="also the top-k ensemble; None: full only")
    seq_len: int = Field(128, ge=8, le=131072)
    max_sequences: int = Field(64, ge=1, description="evaluation sequences per domain")
    prior_sample: int = Field(64, ge=1, description="sequences for each cached prior")


class Score(BaseModel):
    loss: float  # nats per token
    perplexity: float
    tokens: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.perplexity)


class Report(BaseModel):
    """Perplexity per row (seed, experts, ensembles, averages) and domain (column)."""

    forest: str
    manifest_revision: int
    experts: list[str]
    domains: list[str]
    rows: dict[str, dict[str, Score]]  # row -> domain -> score (see row_order)
    weights: dict[str, dict[str, float]]  # domain -> expert -> cached prior (averaging weights)
    prior_source: dict[str, str]  # domain -> "held-out" | "uniform"
    top_k: int | None = None
    mix_revision: int | None = None  # the mix of the moe rows (manifest.mix.mix.number)
    seconds: float = 0.0

    def row_order(self) -> list[str]:
        """Display order: seed, experts, ensembles, the two averages, then the mix."""
        order = [SEED, *map(expert_row, self.experts), ENSEMBLE]
        order += [top_k_row(self.top_k)] if self.top_k else []
        order += [AVERAGE_POSTERIOR, AVERAGE_UNIFORM, MOE_UNTRAINED, MOE]
        return [row for row in order if row in self.rows]

    def perplexity(self, row: str, domain: str) -> float:
        score = self.rows.get(row, {}).get(domain)
        return score.perplexity if score is not None else math.nan

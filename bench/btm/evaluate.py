"""Test perplexity of trained forests, per domain and model (row).

Rows of an expert set: each expert on its own domain (elsewhere the best single expert, chosen
on the test set: generous), the posterior ensemble (Bayes rule per position from the cached
prior, the paper's eq. 2), the same keeping the top k per position, "routed" top k (k experts
fixed per domain from the cached prior: only they run), and the posterior-weighted and uniform
parameter averages. A domain's cached prior comes from its validation text, never its test text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bench.btm.scale import Scale

if TYPE_CHECKING:
    import torch

SEED, DENSE, EXPERT, ENSEMBLE = "seed", "dense", "expert", "ensemble"
POSTERIOR_AVG, UNIFORM_AVG = "posterior average", "uniform average"
RANDOM = "random-split"  # the prefix of the random-split control's rows

Rows = dict[str, dict[str, float]]  # row -> domain -> test perplexity


def top_k_row(k: int) -> str:
    return f"ensemble top-{k}"


def routed_row(k: int) -> str:
    return f"ensemble routed top-{k}"


def random_row(row: str) -> str:
    return f"{RANDOM} {row}"


class Evaluator:
    """Scores models of forests that share one tokenizer; each (model, domain) once."""

    def __init__(self, corpus: Path, tokenizer_forest: Path, scale: Scale) -> None:
        from elmtrain.forest import Forest
        from elmtrain.runtime import setup_runtime

        self.corpus, self.scale = corpus, scale
        self.runtime = setup_runtime()
        self.tokenizer = Forest.open(str(tokenizer_forest)).tokenizer()
        self._text: dict[tuple[str, str], torch.Tensor] = {}
        self._scores: dict[tuple[Path, str], torch.Tensor] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="btm-eval-")

    def close(self) -> None:
        self._scratch.cleanup()

    def text(self, domain: str, split: str) -> torch.Tensor:
        """The test sequences, or the validation sample that estimates the cached prior."""
        from elmtrain.data import cache_store, load_sequences, sample_sequences

        key = (domain, split)
        if key not in self._text:
            path = self.corpus / domain / f"{split}.txt"
            store = cache_store(self.tokenizer)
            sequences = load_sequences([str(path)], store, self.scale.seq_len)
            self._text[key] = (
                sequences[: self.scale.eval_sequences]
                if split == "test"
                else sample_sequences(sequences, self.scale.prior_sequences, 0)
            )
        return self._text[key]

    def logprobs(self, model: Path, domain: str) -> torch.Tensor:
        from elmtrain.scoring.evaluation import model_logprobs

        key = (model, domain)
        if key not in self._scores:
            self._scores[key] = model_logprobs(model, self.text(domain, "test"), self.runtime)
        return self._scores[key]

    def perplexity(self, model: Path, domain: str) -> float:
        from elmtrain.scoring.logprobs import perplexity

        return perplexity(self.logprobs(model, domain))[1]

    def models(self, forest: Path) -> tuple[Path, dict[str, Path]]:
        """A forest's seed and its experts by domain, as local folders."""
        from elmtrain.forest import Forest

        opened = Forest.open(str(forest))
        experts = opened.manifest().sorted_experts()
        return opened.seed_dir(), {e.domain: opened.fetch(e) for e in experts}

    def expert_set(self, experts: dict[str, Path], domains: tuple[str, ...]) -> Rows:
        """The rows of one set of experts (module docstring) on each domain."""
        import torch

        from elmtrain.model.averaging import average_models
        from elmtrain.scoring.evaluation import domain_prior
        from elmtrain.scoring.logprobs import ensemble_logprobs, perplexity, route

        k = self.scale.top_k
        names, dirs = list(experts), list(experts.values())
        rows: Rows = {}
        scratch = Path(tempfile.mkdtemp(dir=self._scratch.name))
        uniform = scratch / "uniform"
        average_models(dirs, [1.0] * len(dirs), uniform)
        for domain in domains:
            prior = domain_prior(dirs, self.text(domain, "valid"), self.runtime)
            prior_t = torch.tensor(prior, dtype=torch.float64)
            per_expert = torch.stack([self.logprobs(d, domain) for d in dirs])
            own = (
                names.index(domain)
                if domain in names
                else min(range(len(names)), key=lambda j: perplexity(per_expert[j])[1])
            )
            chosen = route(prior_t, k)
            weighted = scratch / f"posterior-{domain}"
            average_models(dirs, prior, weighted)
            for row, logprobs in (
                (EXPERT, per_expert[own]),
                (ENSEMBLE, ensemble_logprobs(per_expert, prior_t)),
                (top_k_row(k), ensemble_logprobs(per_expert, prior_t, k)),
                (routed_row(k), ensemble_logprobs(per_expert[chosen], prior_t[chosen])),
            ):
                rows.setdefault(row, {})[domain] = perplexity(logprobs)[1]
            # Averages are one-off models: scored without keeping their scores.
            rows.setdefault(POSTERIOR_AVG, {})[domain] = self._fresh_perplexity(weighted, domain)
            rows.setdefault(UNIFORM_AVG, {})[domain] = self.perplexity(uniform, domain)
        return rows

    def _fresh_perplexity(self, model: Path, domain: str) -> float:
        from elmtrain.scoring.evaluation import model_logprobs
        from elmtrain.scoring.logprobs import perplexity

        return perplexity(model_logprobs(model, self.text(domain, "test"), self.runtime))[1]


def main_rows(evaluator: Evaluator, forest: Path, dense: Path, control: Path) -> Rows:
    """One training seed of the main comparison, on every evaluated domain."""
    domains = evaluator.scale.evaluated
    seed, experts = evaluator.models(forest)
    rows: Rows = {
        SEED: {d: evaluator.perplexity(seed, d) for d in domains},
        DENSE: {d: evaluator.perplexity(evaluator.models(dense)[1]["dense"], d) for d in domains},
    }
    rows |= evaluator.expert_set(experts, domains)
    control_rows = evaluator.expert_set(evaluator.models(control)[1], domains)
    for row in (ENSEMBLE, POSTERIOR_AVG, UNIFORM_AVG):
        rows[random_row(row)] = control_rows[row]
    return rows


def new_expert_scores(evaluator: Evaluator, forest: Path) -> dict[str, dict[str, object]]:
    """The incremental experts of one strategy: test perplexity on their own domain and the
    validation learning curve their training recorded (metrics.curve)."""
    from elmtrain.forest import Forest

    manifest = Forest.open(str(forest)).manifest()
    _, experts = evaluator.models(forest)
    return {
        domain: {
            "test_perplexity": evaluator.perplexity(experts[domain], domain),
            "curve": [[p.step, p.perplexity] for p in manifest.experts[domain].metrics.curve],
            "parents": {
                p.domain or p.kind: round(p.weight, 4) for p in manifest.experts[domain].parents
            },
        }
        for domain in evaluator.scale.new
    }

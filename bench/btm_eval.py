"""Scores of one trained forest for ``bench.btm_quality``: test perplexity per domain and model.

Rows: the seed, the dense model, each expert on its own domain (the best single expert on the
out-of-domain set), the posterior ensemble (full, top-k per position, routed top-k by the cached
prior), and the posterior-weighted and uniform parameter averages. The cached prior of a domain
comes from its validation text, never from its test text.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import table

if TYPE_CHECKING:
    from bench.btm_quality import Scale

SEED, DENSE, EXPERT, FULL = "seed", "dense", "expert", "ensemble"
POSTERIOR_AVG, UNIFORM_AVG = "posterior average", "uniform average"


def top_k_row(k: int) -> str:
    return f"ensemble top-{k}"


def routed_row(k: int) -> str:
    return f"ensemble routed top-{k}"


def evaluate_forest(
    forest_dir: Path, dense_dir: Path | None, corpus: Path, scale: Scale
) -> dict[str, Any]:
    import torch

    from elmtrain.averaging import average_models
    from elmtrain.data import load_sequences, sample_sequences
    from elmtrain.evaluation import domain_prior, expert_logprobs, model_logprobs
    from elmtrain.forest import Forest
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring import ensemble_logprobs, perplexity, route

    runtime = setup_runtime()
    forest = Forest.open(str(forest_dir))
    tokenizer = forest.tokenizer()
    experts = forest.manifest().sorted_experts()
    names = [e.domain for e in experts]
    dirs = [forest.fetch(e) for e in experts]
    dense = Forest.open(str(dense_dir)).model_dir("expert:dense") if dense_dir else None
    rows: dict[str, dict[str, float]] = {}
    priors: dict[str, dict[str, float]] = {}

    def score(row: str, domain: str, logprobs: torch.Tensor) -> None:
        rows.setdefault(row, {})[domain] = perplexity(logprobs)[1]

    with tempfile.TemporaryDirectory() as tmp:
        uniform = Path(tmp) / "uniform"
        average_models(dirs, [1.0] * len(dirs), uniform)
        for domain in (*scale.domains, scale.ood):

            def text(split: str, domain: str = domain) -> torch.Tensor:
                return load_sequences(
                    [str(corpus / domain / f"{split}.txt")], tokenizer, scale.seq_len
                )

            test = text("test")[: scale.eval_sequences]
            prior = domain_prior(
                dirs, sample_sequences(text("valid"), scale.prior_sequences, 0), runtime
            )
            priors[domain] = dict(zip(names, prior, strict=True))
            prior_t = torch.tensor(prior, dtype=torch.float64)
            per_expert = expert_logprobs(dirs, test, runtime)
            score(SEED, domain, model_logprobs(forest.seed_dir(), test, runtime))
            if dense is not None:
                score(DENSE, domain, model_logprobs(dense, test, runtime))
            if domain in names:
                score(EXPERT, domain, per_expert[names.index(domain)])
            else:  # out of domain: the best single expert, chosen on the test set (generous)
                best = min(range(len(names)), key=lambda j: perplexity(per_expert[j])[1])
                score(EXPERT, domain, per_expert[best])
            score(FULL, domain, ensemble_logprobs(per_expert, prior_t))
            score(
                top_k_row(scale.top_k), domain, ensemble_logprobs(per_expert, prior_t, scale.top_k)
            )
            chosen = route(prior_t, scale.top_k)
            score(
                routed_row(scale.top_k),
                domain,
                ensemble_logprobs(per_expert[chosen], prior_t[chosen]),
            )
            weighted = Path(tmp) / f"posterior-{domain}"
            average_models(dirs, prior, weighted)
            score(POSTERIOR_AVG, domain, model_logprobs(weighted, test, runtime))
            score(UNIFORM_AVG, domain, model_logprobs(uniform, test, runtime))
    summary = {
        row: {
            "in_domain_mean": statistics.fmean(values[d] for d in scale.domains),
            "out_of_domain": values[scale.ood],
        }
        for row, values in rows.items()
    }
    return {"perplexity": rows, "summary": summary, "priors": priors}


def orderings(main: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    """The paper's claims, checked on the main forest: per domain, and on the mean."""
    ppl = main["perplexity"]
    checks = []
    for better, worse, claim in (
        (FULL, DENSE, "the ensemble beats the compute-matched dense model"),
        (POSTERIOR_AVG, UNIFORM_AVG, "the posterior-weighted average beats the uniform one"),
    ):
        wins = [d for d in scale.domains if ppl[better][d] < ppl[worse][d]]
        mean = main["summary"]
        checks.append(
            {
                "claim": claim + " in domain",
                "holds": mean[better]["in_domain_mean"] < mean[worse]["in_domain_mean"],
                "detail": f"mean {mean[better]['in_domain_mean']:.2f} vs "
                f"{mean[worse]['in_domain_mean']:.2f}; "
                f"better on {len(wins)} of {len(scale.domains)} domains",
            }
        )
        checks.append(
            {
                "claim": claim + f" out of domain ({scale.ood})",
                "holds": ppl[better][scale.ood] < ppl[worse][scale.ood],
                "detail": f"{ppl[better][scale.ood]:.2f} vs {ppl[worse][scale.ood]:.2f}",
            }
        )
    return checks


def summary_tables(results: dict[str, Any], scale: Scale) -> str:
    ppl = results["main"]["perplexity"]
    domains = [*scale.domains, scale.ood]
    main = table(["model", *domains], [[row, *(ppl[row][d] for d in domains)] for row in ppl])
    checks = table(
        ["claim", "holds", "detail"],
        [[c["claim"], "yes" if c["holds"] else "no", c["detail"]] for c in results["orderings"]],
    )
    sweep_rows = [
        [
            fraction,
            *(
                rows[r][k]
                for r in (FULL, POSTERIOR_AVG)
                for k in ("in_domain_mean", "out_of_domain")
            ),
        ]
        for fraction, rows in results["sweep"].items()
    ]
    sweep = table(
        [
            "seed fraction",
            "ensemble in-domain",
            f"ensemble {scale.ood}",
            "posterior avg in-domain",
            f"posterior avg {scale.ood}",
        ],
        sweep_rows,
    )
    return f"{main}\n\n{checks}\n\n{sweep}"


def plot(results: dict[str, Any], scale: Scale, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = results["main"]["perplexity"]
    domains = [*scale.domains, scale.ood]
    figure, (bars, sweep) = plt.subplots(1, 2, figsize=(15, 5), width_ratios=(3, 1))
    width = 0.8 / len(ppl)
    for i, (row, values) in enumerate(ppl.items()):
        bars.bar(
            [x + i * width for x in range(len(domains))],
            [values[d] for d in domains],
            width,
            label=row,
        )
    bars.set_xticks([x + 0.4 - width / 2 for x in range(len(domains))], domains, rotation=20)
    bars.set_yscale("log")
    bars.set_ylabel("test perplexity (log scale)")
    bars.set_title(f"seed fraction {round(scale.main_fraction * 100)}%, lower is better")
    bars.legend(fontsize=7, ncol=2)
    fractions = list(results["sweep"])
    for row in (FULL, POSTERIOR_AVG, UNIFORM_AVG):
        for key, style in (("in_domain_mean", "-o"), ("out_of_domain", "--s")):
            sweep.plot(
                fractions,
                [results["sweep"][f][row][key] for f in fractions],
                style,
                label=f"{row}, {'in-domain' if key == 'in_domain_mean' else scale.ood}",
            )
    sweep.set_xlabel("share of the compute spent on the seed")
    sweep.set_ylabel("test perplexity")
    sweep.set_title("seed-fraction sweep")
    sweep.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

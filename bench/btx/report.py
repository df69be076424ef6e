"""The BTX results as Markdown tables (pasted into docs/btx.md) and one figure: perplexity by
model and domain group, and each model's held-out perplexity against its inference cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.btm.evaluate import DENSE, ENSEMBLE, POSTERIOR_AVG, UNIFORM_AVG, routed_row, top_k_row
from bench.btm.report import as_main, domain_table, main_table, orderings_table
from bench.btx import cost
from bench.common import table

COMMAND = "python -m bench.btx"


def mix_row(router: str, finetuned: bool) -> str:
    return f"mix ({router} router){' finetuned' if finetuned else ''}"


MIX_FT, MIX = mix_row("centroids", True), mix_row("centroids", False)
CLAIMS = (
    ("the finetuned mix beats the compute-matched dense model", MIX_FT, DENSE),
    ("finetuning improves the mix", MIX_FT, MIX),
    ("the finetuned mix beats the routed top-2 ensemble", MIX_FT, routed_row(2)),
    ("the finetuned mix beats the full ensemble", MIX_FT, ENSEMBLE),
    ("the finetuned mix beats the posterior average", MIX_FT, POSTERIOR_AVG),
    ("centroid router init beats random (finetuned)", MIX_FT, mix_row("random", True)),
    ("centroid router init beats random (before finetuning)", MIX, mix_row("random", False)),
    ("the ensemble beats the compute-matched dense model", ENSEMBLE, DENSE),
)
# Which measured cost row each perplexity row has (the same architecture runs).
COST_OF = {
    DENSE: cost.DENSE,
    POSTERIOR_AVG: cost.AVERAGE,
    UNIFORM_AVG: cost.AVERAGE,
    ENSEMBLE: cost.ALL,
    top_k_row(2): cost.TOP2,
    routed_row(2): cost.ROUTED,
    MIX: cost.MIX,
    MIX_FT: cost.MIX,
}


def cost_table(results: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{v['active_parameters']:,}",
            f"{v['active_parameters_vs_dense']:.2f}",
            f"{v['scoring_tokens_per_second']:,.0f}",
            f"{v['scoring_tokens_per_second_vs_dense']:.2f}",
            f"{v['generation_tokens_per_second']:,.0f}",
            f"{v['generation_tokens_per_second_vs_dense']:.2f}",
        ]
        for name, v in results["cost"]["rows"].items()
    ]
    header = [
        "model",
        "active params/token",
        "x dense",
        "scoring tok/s",
        "x dense",
        "generating tok/s",
        "x dense",
    ]
    return table(header, rows)


def markdown(results: dict[str, Any]) -> str:
    wrapped = as_main(results)
    sections = [
        ("Test perplexity (mean ± sd over seeds)", main_table(wrapped)),
        ("Per domain (mean over seeds)", domain_table(wrapped)),
        ("Orderings (held only if every seed agrees)", orderings_table(wrapped)),
        (
            "Inference cost (training seed 0's models; tokens/s as ratios to dense)",
            cost_table(results),
        ),
    ]
    return "\n\n".join(f"{title} (`{COMMAND}`):\n\n{body}" for title, body in sections)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, tradeoff) = plt.subplots(1, 2, figsize=(15, 5.5))
    groups, spread = list(results["groups"]), results["spread"]
    width = 0.8 / len(spread)
    colors = plt.get_cmap("tab20")(range(20))
    for i, (row, values) in enumerate(spread.items()):
        bars.bar(
            [x + i * width for x in range(len(groups))],
            [values[g]["mean"] for g in groups],
            width,
            yerr=[values[g]["std"] for g in groups],
            label=row,
            color=colors[i % len(colors)],
        )
    bars.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups)
    bars.set_yscale("log")
    bars.set(ylabel="test perplexity (log)", title="BTX, BTM and dense (error bars: sd over seeds)")
    bars.legend(fontsize=6, ncol=2)

    measured, order = results["cost"]["rows"], list(spread)
    for row, name in COST_OF.items():
        if row not in spread or name not in measured:
            continue
        x = 1 / measured[name]["scoring_tokens_per_second_vs_dense"]
        for group, marker in (("in-domain", "o"), ("held-out", "s")):
            tradeoff.errorbar(
                x,
                spread[row][group]["mean"],
                yerr=spread[row][group]["std"],
                fmt=marker,
                color=colors[order.index(row) % len(colors)],  # the bars' color for the row
                label=f"{row} ({group})",
            )
    tradeoff.set_yscale("log")
    tradeoff.set(
        xlabel="scoring time per token (x dense)",
        ylabel="test perplexity (log)",
        title="quality against inference cost (o: in-domain, s: held-out)",
    )
    tradeoff.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

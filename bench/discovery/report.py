"""The discovery results as Markdown tables (docs/benchmarks.md, docs/discovery.md) and one
figure: perplexity against the number of clusters, beside the labelled forest and dense."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from bench.btm.evaluate import DENSE
from bench.btm.report import as_main, domain_table, main_table, orderings_table, pm
from bench.common import table
from bench.discovery.evaluate import LABELLED, cluster_row, forest_name, posterior_row
from bench.discovery.scale import DiscoveryScale

COMMAND = "python -m bench.discovery"


def claims(scale: DiscoveryScale) -> list[tuple[str, str, str]]:
    """(claim, better row, worse row): c-BTM's orderings, and the routing comparison."""
    counts, most = scale.cluster_counts, max(scale.cluster_counts)
    labelled = len(scale.domains)
    out = [
        (f"{k} clusters beat the dense model", cluster_row(forest_name(k)), DENSE) for k in counts
    ]
    out += [
        (f"{b} clusters beat {a}", cluster_row(forest_name(b)), cluster_row(forest_name(a)))
        for a, b in itertools.pairwise(counts)
    ]
    out += [
        (
            f"{most} clusters beat the {labelled} labelled domains",
            cluster_row(forest_name(most)),
            posterior_row(LABELLED),
        ),
        (
            f"cluster routing beats posterior routing ({most} clusters, every expert)",
            cluster_row(forest_name(most)),
            posterior_row(forest_name(most)),
        ),
        (
            f"cluster routing beats posterior routing ({most} clusters, top-1)",
            cluster_row(forest_name(most), True),
            posterior_row(forest_name(most), True),
        ),
    ]
    return out


def cost_table(results: dict[str, Any]) -> str:
    cost = results["cost"]
    rows = [
        [
            row,
            f"{v['experts_per_token']:.2f}",
            f"{v['routing_ms_per_token']:.3f}",
            f"{v['ms_per_token']:.3f}",
        ]
        for row, v in cost["rows"].items()
    ]
    header = ["model", "experts run per token", "routing ms/token", "ms/token (this machine)"]
    return table(header, rows)


def clusters_table(results: dict[str, Any]) -> str:
    """NMI per k over the seeds, and each seed-0 cluster's largest domains."""
    found = results["clusters"]
    first = found["per_seed"][next(iter(found["per_seed"]))]
    rows = []
    for k, spread in found["nmi"].items():
        parts = []
        for cluster, domains in first[k]["composition"].items():
            size = sum(domains.values())
            top = sorted(domains.items(), key=lambda item: -item[1])[:2]
            parts.append(f"{cluster} {size}: " + ", ".join(f"{d} {n / size:.0%}" for d, n in top))
        rows.append([k, pm(spread), "; ".join(parts)])
    return table(
        ["k", "NMI with the hidden labels", "first seed's clusters (largest domains)"], rows
    )


def markdown(results: dict[str, Any]) -> str:
    wrapped = as_main(results)
    sections = [
        ("Test perplexity (mean ± sd over seeds)", main_table(wrapped)),
        ("Per domain (mean over seeds)", domain_table(wrapped)),
        ("Orderings (held only if every seed agrees)", orderings_table(wrapped)),
        ("The clusters against the hidden labels", clusters_table(results)),
        ("Inference cost per scored token", cost_table(results)),
    ]
    return "\n\n".join(f"{title} (`{COMMAND}`):\n\n{body}" for title, body in sections)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, spread = list(results["groups"]), results["spread"]
    counts = [int(k) for k in results["clusters"]["nmi"]]
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5))
    for axis, group in zip(axes, groups, strict=True):
        for top1, style in ((False, "-"), (True, ":")):
            for label, row in (("cluster-routed", cluster_row), ("posterior", posterior_row)):
                names = [row(forest_name(k), top1) for k in counts]
                axis.errorbar(
                    counts,
                    [spread[n][group]["mean"] for n in names],
                    yerr=[spread[n][group]["std"] for n in names],
                    fmt=f"o{style}",
                    capsize=3,
                    label=f"{label}{' top-1' if top1 else ''}",
                )
        for name, color in ((posterior_row(LABELLED), "green"), (DENSE, "black")):
            axis.axhline(spread[name][group]["mean"], color=color, linestyle="--", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(k) for k in counts])
        axis.set(xlabel="clusters (k)", ylabel="test perplexity", title=group)
        axis.legend(fontsize=7)
    figure.suptitle("c-BTM on the pooled corpus (error bars: sd over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

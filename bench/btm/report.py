"""The BTM quality results as Markdown tables (pasted into docs/benchmarks.md) and one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.btm.evaluate import ENSEMBLE, POSTERIOR_AVG, UNIFORM_AVG
from bench.common import table

COMMAND = "python -m bench.btm_quality"


def pm(value: dict[str, float]) -> str:
    """mean ± sample standard deviation over the seeds."""
    return f"{value['mean']:.3g} ± {value['std']:.2g}"


def as_main(results: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's flat results (one comparison: spread, groups, orderings at the top) in the
    shape these tables read (BTM quality's ``main`` section)."""
    return {"main": results, "scale_domains": results["scale_domains"]}


def main_table(results: dict[str, Any]) -> str:
    spread = results["main"]["spread"]
    groups = results["main"]["groups"]
    return table(
        ["model", *groups], [[row, *(pm(v[g]) for g in groups)] for row, v in spread.items()]
    )


def domain_table(results: dict[str, Any]) -> str:
    spread, domains = results["main"]["spread"], results["scale_domains"]
    rows = [[row, *(f"{v[d]['mean']:.3g}" for d in domains)] for row, v in spread.items()]
    return table(["model (mean over seeds)", *domains], rows)


def orderings_table(results: dict[str, Any]) -> str:
    rows = [
        [c["claim"], "**yes**" if c["holds"] else "no", f"{c['relative_gain']:+.1%}", c["detail"]]
        for c in results["main"]["orderings"]
    ]
    return table(["claim", "holds (every seed)", "gain", "detail (mean ± sd)"], rows)


def incremental_table(results: dict[str, Any]) -> str:
    analysis = results["incremental"]["analysis"]
    domains = list(next(iter(analysis["per_domain"].values())))
    by_other = {
        c["claim"].split(" beats ")[1].split(" init")[0]: c for c in analysis["comparisons"]
    }
    rows = []
    for strategy, test in analysis["test"].items():
        versus = by_other.get(strategy)
        saved = ""
        if versus is not None:
            shares = versus["steps_saved"]
            saved = ", ".join("never" if s is None else f"{s:.0%}" for s in shares)
        rows.append(
            [
                strategy,
                *(pm(analysis["per_domain"][strategy][d]) for d in domains),
                pm(test),
                "" if versus is None else f"{versus['relative_gain']:+.1%}",
                "" if versus is None else f"{versus['seeds_held']}/{versus['seeds']}",
                saved,
            ]
        )
    header = [
        "init",
        *domains,
        "mean",
        "posterior's gain",
        "posterior better (seeds)",
        "posterior's steps saved (per seed)",
    ]
    return table(header, rows)


def sweep_table(results: dict[str, Any]) -> str:
    groups = results["main"]["groups"]
    rows = [
        [label, *(f"{rows[r][g]:.3g}" for r in (ENSEMBLE, POSTERIOR_AVG) for g in groups)]
        for label, rows in results["sweep"]["means"].items()
    ]
    header = ["seed fraction", *(f"{r} {g}" for r in ("ensemble", "posterior avg") for g in groups)]
    return table(header, rows)


def count_table(results: dict[str, Any]) -> str:
    counts = results["domain_count"]
    rows = []
    for n, entry in counts["forests"].items():
        cells: list[object] = [n]
        for group in ("in-domain", results["scale"]["ood"]):
            ens, dense = entry["means"][ENSEMBLE][group], entry["means"]["dense"][group]
            cells += [f"{ens:.3g}", f"{dense:.3g}", f"{1 - ens / dense:+.1%}"]
        rows.append(cells)
    ood = results["scale"]["ood"]
    header = [
        "domains",
        "ensemble in-domain",
        "dense in-domain",
        "gain",
        f"ensemble {ood}",
        f"dense {ood}",
        "gain",
    ]
    return table(header, rows)


def markdown(results: dict[str, Any]) -> str:
    sections = [
        ("Main comparison, test perplexity (mean ± sd over seeds)", main_table(results)),
        ("Per domain (mean over seeds)", domain_table(results)),
        ("The paper's orderings", orderings_table(results)),
        ("Incremental branching: the new domains' experts", incremental_table(results)),
        ("Seed-fraction sweep (training seed 0)", sweep_table(results)),
        ("Number of domains at equal compute (training seed 0)", count_table(results)),
    ]
    return "\n\n".join(f"{title} (`{COMMAND}`):\n\n{body}" for title, body in sections)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((bars, curves), (sweep, counts)) = plt.subplots(2, 2, figsize=(15, 10))
    groups, spread = results["main"]["groups"], results["main"]["spread"]
    width = 0.8 / len(spread)
    colors = plt.get_cmap("tab20")(range(20))  # one colour per row (there are over ten)
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
    bars.set(ylabel="test perplexity (log)", title="main comparison (error bars: sd over seeds)")
    bars.legend(fontsize=6, ncol=2)

    for strategy, per_seed in results["incremental"]["analysis"]["curves"].items():
        steps = [p[0] for p in per_seed[0]]
        mean = [sum(c[i][1] for c in per_seed) / len(per_seed) for i in range(len(steps))]
        low = [min(c[i][1] for c in per_seed) for i in range(len(steps))]
        high = [max(c[i][1] for c in per_seed) for i in range(len(steps))]
        (line,) = curves.plot(steps, mean, "-o", markersize=3, label=f"init: {strategy}")
        curves.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    curves.set_yscale("log")
    curves.set(
        xlabel="steps of the new experts",
        ylabel="validation perplexity (geo. mean of new domains)",
        title="incremental branching: learning curves (band: seed range)",
    )
    curves.legend()

    fractions = list(results["sweep"]["means"])
    for row in (ENSEMBLE, POSTERIOR_AVG, UNIFORM_AVG):
        for group, style in (("in-domain", "-o"), ("held-out", "--s")):
            sweep.plot(
                fractions,
                [results["sweep"]["means"][f][row][group] for f in fractions],
                style,
                label=f"{row}, {group}",
            )
    sweep.set_yscale("log")
    sweep.set(xlabel="seed's share of the compute", ylabel="test perplexity", title="seed fraction")
    sweep.legend(fontsize=7)

    forests = results["domain_count"]["forests"]
    ns = list(forests)
    for group in ("in-domain", results["scale"]["ood"]):
        gains = [
            100 * (1 - forests[n]["means"][ENSEMBLE][group] / forests[n]["means"]["dense"][group])
            for n in ns
        ]
        counts.plot(ns, gains, "-o", label=group)
    counts.axhline(0, color="grey", linewidth=0.8)
    counts.set(
        xlabel="domains (same total compute)",
        ylabel="ensemble's gain over dense (%)",
        title="number of domains",
    )
    counts.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

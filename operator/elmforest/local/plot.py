"""The report as a picture: a heatmap of perplexity, rows = models, columns = domains.

Colour is each cell's perplexity relative to the best in its column (log scale), so a glance
shows which model wins where; the numbers are printed in the cells.
"""

from __future__ import annotations

import math
from pathlib import Path

from elmcore.report import Report
from elmforest.local.report import row_label


def render_png(report: Report, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    rows, domains = report.row_order(), report.domains
    values = [[report.perplexity(r, d) for d in domains] for r in rows]
    best = [
        min((v[j] for v in values if math.isfinite(v[j])), default=math.nan)
        for j in range(len(domains))
    ]
    relative = [
        [
            math.log(v / b) if math.isfinite(v) and b > 0 else math.nan
            for v, b in zip(row, best, strict=True)
        ]
        for row in values
    ]
    figure, axes = plt.subplots(
        figsize=(1.6 + 1.25 * len(domains), 1.2 + 0.42 * len(rows)), layout="constrained"
    )
    image = axes.imshow(relative, cmap="RdYlGn_r", vmin=0.0, vmax=0.7, aspect="auto")
    axes.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), [row_label(r) for r in rows])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            text = f"{value:.0f}" if math.isfinite(value) else "n/a"
            weight = "bold" if value == best[j] else "normal"
            shade = relative[i][j]
            dark = math.isfinite(shade) and (shade < 0.1 or shade > 0.5)  # the colormap's ends
            axes.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=9,
                fontweight=weight,
                color="white" if dark else "black",
            )
    axes.set_title(f"{title}: perplexity (lower is better)", fontsize=10)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("log(ppl / best in column)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

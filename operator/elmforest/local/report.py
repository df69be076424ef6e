"""The forest report: which texts to score, the ``elmtrain report`` run, and its Markdown.

Columns are the merged branches' domains (their ``data.test`` text, else ``data.validation``)
and the forest's extra ``evaluation`` sets; each column's cached prior comes from held-out
text (the branch's validation text, or the set's ``priorData``).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path

from elmcore.config import ModelConfig, TrainingConfig
from elmcore.errors import BadInputError
from elmcore.report import (
    AVERAGE_POSTERIOR,
    AVERAGE_UNIFORM,
    ENSEMBLE,
    MOE,
    MOE_UNTRAINED,
    SEED,
    EvalSet,
    Report,
    ReportRequest,
)
from elmforest.api.branch import ElmBranchSpec
from elmforest.api.forest import ElmForestSpec
from elmforest.local.runner import PROGRAMS
from elmforest.planner.trainer_args import overrides

LABELS = {
    SEED: "seed",
    ENSEMBLE: "ensemble (posterior)",
    AVERAGE_POSTERIOR: "average (posterior-weighted)",
    AVERAGE_UNIFORM: "average (uniform)",
    MOE_UNTRAINED: "moe (mix, untrained)",
    MOE: "moe (mix, finetuned)",
}


def row_label(row: str) -> str:
    if row.startswith("expert:"):
        return f"expert {row.removeprefix('expert:')}"
    if row.startswith("ensemble-top"):
        return f"ensemble (top-{row.removeprefix('ensemble-top')})"
    return LABELS.get(row, row)


def build_request(
    forest: ElmForestSpec, branches: Sequence[ElmBranchSpec], top_k: int | None = 2
) -> ReportRequest:
    sets: dict[str, EvalSet] = {}
    for branch in sorted(branches, key=lambda b: b.domain):
        text = branch.data.test or branch.data.validation
        if text:
            sets[branch.domain] = EvalSet(
                domain=branch.domain, data=text, prior_data=branch.data.validation
            )
    for extra in forest.evaluation:
        sets[extra.domain] = EvalSet(
            domain=extra.domain, data=extra.data, prior_data=extra.prior_data
        )
    if not sets:
        raise BadInputError(
            "nothing to report on: give the branches data.validation or data.test, "
            "or the forest spec.evaluation"
        )
    model = ModelConfig.model_validate(
        {k: v for k, v in overrides(forest.model).items() if k != "pretrained"}
    )
    training = TrainingConfig.model_validate(overrides(forest.branch_defaults))
    return ReportRequest(
        sets=list(sets.values()),
        top_k=top_k,
        seq_len=min(training.seq_len, model.context_length),
    )


def compute(
    forest: ElmForestSpec, request: ReportRequest, folder: Path, env: dict[str, str]
) -> Report:
    """Run ``elmtrain report`` as a local process; its log goes beside the report."""
    folder.mkdir(parents=True, exist_ok=True)
    request_path, out = folder / "request.json", folder / "report.json"
    request_path.write_text(request.model_dump_json(indent=1))
    argv = [*PROGRAMS["elmtrain"], "report", "--forest", forest.storage.uri]
    if forest.storage.endpoint:
        argv += ["--s3-endpoint", forest.storage.endpoint]
    argv += ["--request", f"@{request_path}", "--out", str(out.absolute())]
    with (folder / "report.log").open("wb") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = (folder / "report.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise BadInputError(f"elmtrain report failed ({' '.join(tail)}); see {folder}/report.log")
    return Report.model_validate(json.loads(out.read_text()))


def cached(folder: Path, request: ReportRequest, revision: int | None) -> Report | None:
    """The stored report, if it answers the same request for the same manifest revision."""
    try:
        report = Report.model_validate(json.loads((folder / "report.json").read_text()))
        stored = ReportRequest.model_validate_json((folder / "request.json").read_text())
    except (OSError, ValueError):
        return None
    return report if stored == request and report.manifest_revision == revision else None


def _cell(value: float, best: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.1f}"
    return f"**{text}**" if value == best else text


def render_markdown(report: Report, title: str) -> str:
    """The table (bold: the best in each column) and the averaging weights."""
    domains = report.domains
    lines = [
        f"# {title}",
        "",
        f"Perplexity on each domain's evaluation text (lower is better); forest "
        f"`{report.forest}`, manifest revision {report.manifest_revision}"
        + (f", mix v{report.mix_revision} (spec.mix)." if report.mix_revision else "."),
        "",
        "| model | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    best = {d: min(report.perplexity(r, d) for r in report.row_order()) for d in domains}
    for row in report.row_order():
        cells = [_cell(report.perplexity(row, d), best[d]) for d in domains]
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    lines += ["", "Each expert against the seed on its own domain:", ""]
    for expert in report.experts:
        if expert not in domains:
            continue
        own = report.perplexity(f"expert:{expert}", expert)
        seed = report.perplexity(SEED, expert)
        verdict = "better" if own < seed else "NOT better"
        change = 100 * (own - seed) / seed if seed else math.nan
        lines.append(f"- {expert}: {own:.1f} vs {seed:.1f} ({change:+.0f}%), {verdict}")
    lines += [
        "",
        "Posterior weights per domain (the cached prior: ensemble prior and averaging weights):",
        "",
        "| domain | " + " | ".join(report.experts) + " | prior from |",
        "|---|" + "---:|" * len(report.experts) + "---|",
    ]
    for domain in domains:
        weights = report.weights.get(domain, {})
        cells = [f"{weights.get(e, math.nan):.2f}" for e in report.experts]
        source = report.prior_source.get(domain, "")
        lines.append(f"| {domain} | " + " | ".join(cells) + f" | {source} |")
    return "\n".join(lines) + "\n"

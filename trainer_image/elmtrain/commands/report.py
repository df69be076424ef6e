"""``elmtrain report``: the forest's perplexity table, one column per evaluation domain.

Rows: the seed, every expert, the posterior ensemble (full and top-k), the parameter average
weighted by the domain's cached prior, the uniform average, and, once the forest has a mix
(``spec.mix``, docs/btx.md), the mix before and after its finetuning. Each expert scores each
domain's text once; the ensembles reuse those token log-probabilities, so the table costs about
(experts + 3, + 2 with a mix) forward passes per domain, plus the prior's sample.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elmcore.errors import BadInputError
from elmcore.manifest import ArtifactEntry, Manifest
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
    Score,
    expert_row,
    top_k_row,
)
from elmcore.storage.commit import read_marker
from elmtrain.cache import cache_dir
from elmtrain.commands.common import add_forest_args, open_forest, write_output
from elmtrain.config import load_json_arg, parse_config
from elmtrain.forest import Forest

if TYPE_CHECKING:
    import torch

    from elmtrain.runtime import Runtime


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("report", help="perplexity table: seed, experts, ensembles, averages")
    add_forest_args(parser)
    parser.add_argument(
        "--request", required=True, help="ReportRequest as JSON or @file.json (elmcore.report)"
    )
    parser.add_argument("--out", help="also write the JSON report here")
    parser.set_defaults(func=run)


def _score(logprobs: torch.Tensor) -> Score:
    from elmtrain.scoring.logprobs import perplexity

    loss, ppl, tokens = perplexity(logprobs)
    return Score(loss=loss, perplexity=ppl, tokens=tokens)


def _prior(
    forest: Forest, names: list[str], eval_set: EvalSet, request: ReportRequest, runtime: Runtime
) -> tuple[list[float], str]:
    if not eval_set.prior_data:
        return [1.0 / len(names)] * len(names), "uniform"
    from elmtrain.scoring.priors import forest_prior

    weights = forest_prior(
        forest, eval_set.prior_data, request.prior_sample, request.seq_len, runtime
    )  # stored: the next report of this revision reads it
    return [weights[n] for n in names], "held-out"


def _mix_dirs(forest: Forest, manifest: Manifest) -> dict[str, Path]:
    """The mix's rows and folders: finetuned, and untrained where its folder is still there."""
    if manifest.mix is None:
        return {}
    dirs = {MOE: forest.fetch(manifest.mix)}
    untrained = manifest.mix.mix.untrained_path
    found = read_marker(forest.storage, untrained) if untrained else None
    if found is not None:  # the sha256 read now: the untrained mix is not in the manifest
        dirs = {MOE_UNTRAINED: forest.fetch(ArtifactEntry(path=untrained, sha256=found[1])), **dirs}
    return dirs


def run(args: argparse.Namespace) -> dict[str, Any]:
    # torch and transformers: only when it runs (see elmtrain.cli).
    import torch
    from tqdm import tqdm

    from elmtrain.data.store import load_sequences
    from elmtrain.model.averaging import average_models
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.evaluation import expert_logprobs, model_logprobs
    from elmtrain.scoring.logprobs import ensemble_logprobs

    started = time.monotonic()
    request = parse_config(ReportRequest, load_json_arg(args.request, "--request"), "--request")
    forest = open_forest(args)
    runtime = setup_runtime()
    manifest = forest.manifest()
    experts = manifest.sorted_experts()
    if not experts:
        raise BadInputError("the forest has no experts yet: nothing to report")
    names = [e.domain for e in experts]
    dirs = [forest.fetch(e) for e in experts]
    seed_dir, store = forest.seed_dir(), forest.token_store()
    k = request.top_k if request.top_k is not None and request.top_k < len(names) else None
    order = [SEED, *map(expert_row, names), ENSEMBLE, *([top_k_row(k)] if k else [])]
    rows: dict[str, dict[str, Score]] = {row: {} for row in [*order, AVERAGE_POSTERIOR]}
    rows[AVERAGE_UNIFORM] = {}
    mixes = _mix_dirs(forest, manifest)
    rows.update({row: {} for row in mixes})
    weights: dict[str, dict[str, float]] = {}
    sources: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="report-", dir=cache_dir()) as tmp:
        uniform_dir = Path(tmp) / "uniform"
        average_models(dirs, [1.0] * len(dirs), uniform_dir)
        for eval_set in tqdm(request.sets, desc="report", unit="domain"):
            domain = eval_set.domain
            sequences = load_sequences(eval_set.data, store, request.seq_len, request.max_sequences)
            per_expert = expert_logprobs(dirs, sequences, runtime)  # [K, N, T-1]
            for name, logprobs in zip(names, per_expert, strict=True):
                rows[expert_row(name)][domain] = _score(logprobs)
            rows[SEED][domain] = _score(model_logprobs(seed_dir, sequences, runtime))
            prior, sources[domain] = _prior(forest, names, eval_set, request, runtime)
            weights[domain] = dict(zip(names, prior, strict=True))
            prior_t = torch.tensor(prior, dtype=torch.float64)
            rows[ENSEMBLE][domain] = _score(ensemble_logprobs(per_expert, prior_t))
            if k:
                rows[top_k_row(k)][domain] = _score(ensemble_logprobs(per_expert, prior_t, k))
            average_dir = Path(tmp) / f"posterior-{domain}"
            average_models(dirs, prior, average_dir)
            rows[AVERAGE_POSTERIOR][domain] = _score(
                model_logprobs(average_dir, sequences, runtime)
            )
            shutil.rmtree(average_dir)
            rows[AVERAGE_UNIFORM][domain] = _score(model_logprobs(uniform_dir, sequences, runtime))
            for row, folder in mixes.items():
                rows[row][domain] = _score(model_logprobs(folder, sequences, runtime))
    report = Report(
        forest=str(forest.storage.root),
        manifest_revision=manifest.revision,
        experts=names,
        domains=[s.domain for s in request.sets],
        rows=rows,
        weights=weights,
        prior_source=sources,
        top_k=k,
        mix_revision=manifest.mix.mix.number if manifest.mix else None,
        seconds=round(time.monotonic() - started, 2),
    )
    data = report.model_dump(mode="json")
    write_output(data, args.out, forest.endpoint)
    return data

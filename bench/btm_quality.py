"""BTM quality on the shared corpus: seed, one expert per domain, a compute-matched dense model.

    python -m bench.btm_quality            # the full run (~45 min on 2 CPU cores)
    python -m bench.btm_quality --quick    # 3 domains, tiny model (< 2 min)
    python -m bench.btm_quality --work DIR # keep the models; a rerun trains only what is missing

For each seed fraction f of a total budget of T optimizer steps, a forest trains its seed for
f*T steps on the mixture of all training domains, then one expert per domain for (1-f)*T/n
steps from the seed (the paper's first, parallel stage). At the main fraction a dense model
continues the seed on the mixture for (1-f)*T steps: the same total compute as the forest.
Everything is trained by the real ``elmtrain`` commands; ``bench.btm_eval`` scores the result.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.btm_eval import evaluate_forest, orderings, plot, summary_tables
from bench.common import ROOT, parser, plot_path, write_results


@dataclass(frozen=True)
class Scale:
    domains: tuple[str, ...]
    ood: str
    model: dict[str, Any]
    vocab_size: int
    batch_size: int
    seq_len: int
    total_steps: int  # seed + all experts, per forest
    fractions: tuple[float, ...]
    main_fraction: float
    max_bytes: int | None  # per text file: the quick run reads a prefix
    eval_sequences: int
    prior_sequences: int
    top_k: int = 2


FULL = Scale(
    domains=(
        "changelogs",
        "code",
        "dictionary",
        "legal",
        "manuals",
        "perldocs",
        "quotes",
        "scripture",
    ),
    ood="devil",
    model={"family": "gpt2", "d_model": 96, "n_layers": 3, "n_heads": 4, "context_length": 128},
    vocab_size=2048,
    batch_size=16,
    seq_len=128,
    total_steps=2400,
    fractions=(0.1, 0.3, 0.5),
    main_fraction=0.5,
    max_bytes=None,
    eval_sequences=128,
    prior_sequences=32,
)
QUICK = Scale(
    domains=("code", "legal", "scripture"),
    ood="devil",
    model={"family": "gpt2", "d_model": 32, "n_layers": 1, "n_heads": 2, "context_length": 64},
    vocab_size=512,
    batch_size=8,
    seq_len=64,
    total_steps=120,
    fractions=(0.3, 0.5),
    main_fraction=0.5,
    max_bytes=200_000,
    eval_sequences=16,
    prior_sequences=8,
)


def elmtrain(*argv: str) -> None:
    """The real CLI, in this process (no interpreter start-up per command)."""
    from elmtrain.cli import main

    code = main(["--log-level", "warning", *argv])
    if code != 0:
        raise RuntimeError(f"elmtrain {argv[0]} exited {code}")


def _prepare_corpus(corpus: Path, scale: Scale, work: Path) -> Path:
    """The corpus itself, or (quick) a copy of each file's first ``max_bytes`` at a document end."""
    if scale.max_bytes is None:
        return corpus
    copy = work / "corpus"
    for domain in (*scale.domains, scale.ood):
        for split in ("train", "valid", "test"):
            text = (corpus / domain / f"{split}.txt").read_text()
            cut = text.rfind("\n\n\n", 0, scale.max_bytes)
            (copy / domain).mkdir(parents=True, exist_ok=True)
            (copy / domain / f"{split}.txt").write_text(text[: cut if cut > 0 else scale.max_bytes])
    return copy


def _training(scale: Scale, steps: int) -> str:
    return json.dumps(
        {
            "steps": steps,
            "batch_size": scale.batch_size,
            "seq_len": scale.seq_len,
            "warmup_steps": max(1, steps // 20),
            "learning_rate": 3e-3,
            "checkpoint_interval": max(steps, 1),
            "eval_batches": 2,
            "progress_interval_seconds": 60,
        }
    )


def _merged(forest: Path) -> dict[str, Any]:
    """What a forest's manifest already holds, so a rerun with ``--work`` trains only the rest."""
    manifest = forest / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def train_forest(corpus: Path, scale: Scale, template: Path, forest: Path, fraction: float) -> Path:
    """Seed for f*T steps, then each expert for (1-f)*T/n; returns the dense model's forest
    (trained only at the main fraction). Models already merged in ``forest`` are kept."""
    if _merged(forest).get("seed") is None:
        shutil.rmtree(forest, ignore_errors=True)
        shutil.copytree(template, forest)
        _seed(corpus, scale, forest, fraction)
    seed_steps = round(fraction * scale.total_steps)
    branch_budget = scale.total_steps - seed_steps
    train = [str(corpus / d / "train.txt") for d in scale.domains]
    valid = [str(corpus / d / "valid.txt") for d in scale.domains]
    dense = forest.with_name(forest.name + "-dense")
    if fraction == scale.main_fraction and "dense" not in _merged(dense).get("experts", {}):
        # Dense: the same seed, trained on for as many steps as all the experts together.
        shutil.rmtree(dense, ignore_errors=True)
        shutil.copytree(forest, dense)  # before any expert: the dense run's own forest
        _branch(scale, dense, "dense", train, valid, branch_budget)
    steps = branch_budget // len(scale.domains)
    for domain in scale.domains:
        if domain not in _merged(forest).get("experts", {}):
            shutil.rmtree(forest / "runs" / f"branch.{domain}.v1", ignore_errors=True)
            _branch(
                scale,
                forest,
                domain,
                [str(corpus / domain / "train.txt")],
                [str(corpus / domain / "valid.txt")],
                steps,
            )
    return dense


def _seed(corpus: Path, scale: Scale, forest: Path, fraction: float) -> None:
    elmtrain(
        "seed",
        "--forest",
        str(forest),
        "--data",
        *[str(corpus / d / "train.txt") for d in scale.domains],
        "--val-data",
        *[str(corpus / d / "valid.txt") for d in scale.domains],
        "--model",
        json.dumps(scale.model),
        "--training",
        _training(scale, round(fraction * scale.total_steps)),
        "--merge",
    )


def _branch(
    scale: Scale, forest: Path, domain: str, train: list[str], valid: list[str], steps: int
) -> None:
    elmtrain(
        "branch",
        "--forest",
        str(forest),
        "--domain",
        domain,
        "--data",
        *train,
        "--val-data",
        *valid,
        "--init",
        "seed",
        "--training",
        _training(scale, steps),
        "--merge",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--domains", help="comma-separated training domains (default: the scale's)")
    cli.add_argument("--ood", help="the out-of-domain evaluation domain (default: devil)")
    cli.add_argument("--work", type=Path, help="keep the forests here (default: a temp folder)")
    args = cli.parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.domains or args.ood:
        domains = tuple(args.domains.split(",")) if args.domains else scale.domains
        scale = Scale(**{**asdict(scale), "domains": domains, "ood": args.ood or scale.ood})
    if not (args.corpus / scale.ood / "test.txt").is_file():
        raise SystemExit(f"{args.corpus}: no corpus here (see ../shared/corpus/README.md)")
    with tempfile.TemporaryDirectory(prefix="btm-quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = _prepare_corpus(args.corpus, scale, work)
        template = work / "template"
        if _merged(template).get("tokenizer") is None:
            shutil.rmtree(template, ignore_errors=True)
            elmtrain(
                "tokenizer",
                "--forest",
                str(template),
                "--vocab-size",
                str(scale.vocab_size),
                "--data",
                *[str(corpus / d / "train.txt") for d in scale.domains],
                "--merge",
            )
        forests: dict[float, dict[str, Any]] = {}
        main_dense: Path | None = None
        for fraction in scale.fractions:
            forest = work / f"forest-seed{round(fraction * 100)}"
            dense = train_forest(corpus, scale, template, forest, fraction)
            if fraction == scale.main_fraction:
                main_dense = dense
            forests[fraction] = evaluate_forest(
                forest, dense if fraction == scale.main_fraction else None, corpus, scale
            )
    assert main_dense is not None
    main_rows = forests[scale.main_fraction]
    results = {
        "scale": asdict(scale),
        "main": main_rows,
        "orderings": orderings(main_rows, scale),
        "sweep": {f"{round(f * 100)}%": forests[f]["summary"] for f in scale.fractions},
    }
    path = write_results("btm_quality", results, args)
    plot(results, scale, plot_path("btm_quality", args))
    print(summary_tables(results, scale))
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()

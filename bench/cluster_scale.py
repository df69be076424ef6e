"""c-BTM's assignment at scale: one ``elmtrain cluster-assign`` worker over growing corpora.

    python -m bench.cluster_scale            # 0.05, 1 and 5 GB (~10 min, one core)
    python -m bench.cluster_scale --quick    # 10 and 40 MB (< 1 min)

The corpus is the shared corpus' training text repeated into one JSON-lines file of each size
(``bench.data.make_corpus``: whole copies of the text, so at least one, 77 MB); a clusterer
(k = 8, tf-idf of 50,000 terms) is fitted by ``elmtrain cluster-fit`` on a 10,000-document
sample of the smallest. Each run is one worker
(``--count 1``, one torch/BLAS thread) assigning every document and writing the clusters' JSON
lines, without tokenizing (``--no-tokenize``: tokenizing is ``prepare``'s cost, measured by
``bench.data``): peak RSS of its process tree and MB/s of text per core. The claim it checks:
memory does not grow with the corpus (documents stream through in batches; only the per-cluster
output files grow, on disk).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, python_module, table, write_results
from bench.data import make_corpus, measured_tree

FULL: dict[str, Any] = {"sizes_gb": [0.05, 1.0, 5.0], "clusters": 8, "sample": 10_000}
QUICK: dict[str, Any] = {"sizes_gb": [0.01, 0.1], "clusters": 4, "sample": 500}
ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def fit(forest: Path, text: Path, scale: dict[str, Any]) -> None:
    command = python_module(
        "elmtrain", "cluster-fit", "--forest", str(forest), "--set", "scale",
        "--data", str(text), "--clusters", str(scale["clusters"]),
        "--sample", str(scale["sample"]),
    )  # fmt: skip
    measured_tree(command, env=ONE_CORE)


def assign(forest: Path, text: Path) -> dict[str, float]:
    command = python_module(
        "elmtrain", "cluster-assign", "--forest", str(forest), "--set", "scale",
        "--data", str(text), "--count", "1", "--no-tokenize",
    )  # fmt: skip
    measured = measured_tree(command, env=ONE_CORE)
    size = text.stat().st_size
    return {
        "bytes": size,
        **measured,
        "mb_per_second_per_core": round(size / 1e6 / measured["seconds"], 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--work", type=Path, help="keep the corpora and forest here")
    args = cli.parse_args(argv)
    scale = QUICK if args.quick else FULL
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for gigabytes in scale["sizes_gb"]:
            text = work / f"corpus-{gigabytes}.jsonl"
            make_corpus(args.corpus, gigabytes, text)
            forest = work / f"forest-{gigabytes}"  # each run writes its own clusters' files
            fit(forest, work / f"corpus-{scale['sizes_gb'][0]}.jsonl", scale)
            rows.append({"gigabytes": gigabytes, **assign(forest, text)})
            if gigabytes != scale["sizes_gb"][0]:
                text.unlink()  # the biggest corpora are not kept
    results = {"scale": scale, "rows": rows}
    path = write_results("cluster_scale", results, args)
    print(
        table(
            ["corpus GB", "seconds", "MB/s per core", "peak RSS MB"],
            [
                [
                    round(r["bytes"] / 1e9, 2),
                    r["seconds"],
                    r["mb_per_second_per_core"],
                    r["peak_rss_mb"],
                ]
                for r in rows
            ],
        )
    )
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""One cell of ``bench.serve --before`` with enough requests to settle a few percent: this
checkout's ``elmtrain serve`` against another checkout's, one endpoint, one client count,
taking turns for several rounds (the other one first every second round).

    python -m bench.serve_ab --before /tmp/serve-before --size gpt2-4x256 --model expert
    python -m bench.serve_ab --before /tmp/serve-before --size quickstart --model forest

``bench.serve``'s single-client levels are 12 requests (4-7 s), too few for a 5 % question on
2 shared cores; this runs ``--requests`` per round (default 40) for ``--rounds`` (default 4).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.serve import FULL, _forest, _level, _prompts, before_env, check_before


def main(argv: list[str] | None = None) -> dict[str, float]:
    from tests.harness.serve import serving

    cli = argparse.ArgumentParser(prog="bench.serve_ab", description=__doc__)
    cli.add_argument("--before", type=Path, required=True, help="the other checkout")
    cli.add_argument("--size", choices=sorted(FULL), default="gpt2-4x256")
    cli.add_argument("--model", choices=("forest", "expert"), default="expert")
    cli.add_argument("--clients", type=int, default=1)
    cli.add_argument("--requests", type=int, default=40)
    cli.add_argument("--rounds", type=int, default=4)
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    args = cli.parse_args(argv)
    commit = check_before(args.before)
    scale: dict[str, Any] = FULL[args.size]
    model = "forest" if args.model == "forest" else f"forest/expert/{scale['domains'][0]}"
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-ab-") as tmp:
        work = Path(tmp)
        forest = str(_forest(args.corpus, scale, work))
        extra = ("--name", "forest", "--max-batch", "64", "--dtype", "float32")
        with (
            serving(forest, work, *extra) as now,
            serving(forest, work, *extra, env=before_env(args.before)) as old,
        ):
            prompts = _prompts(args.corpus, scale, args.requests)
            for served in (now, old):  # warm
                asyncio.run(_level(served.url, model, prompts[:4], 1, scale["max_tokens"]))
            for round_ in range(args.rounds):
                turns = [("now", now), ("before", old)]
                rates: dict[str, float] = {}
                for name, served in turns if round_ % 2 == 0 else turns[::-1]:
                    level = asyncio.run(
                        _level(served.url, model, prompts, args.clients, scale["max_tokens"])
                    )
                    rates[name] = level["tokens_per_second"]
                ratios.append(rates["now"] / rates["before"])
                print(f"round {round_}: {rates} now/before {ratios[-1]:.3f}", flush=True)
    summary = {
        "median": round(statistics.median(ratios), 3),
        "geometric_mean": round(statistics.geometric_mean(ratios), 3),
    }
    print(f"{args.size} {model} at {args.clients} client(s) against {commit}: {summary}")
    return summary


if __name__ == "__main__":
    main()

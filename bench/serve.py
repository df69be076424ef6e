"""Serving throughput: ``elmtrain serve`` under 1, 8 and 32 concurrent clients, against a plain
one-request-at-a-time ``transformers`` generate loop.

    python -m bench.serve            # two sizes of 4 experts, 64 new tokens a request (~9 min)
    python -m bench.serve --quick    # tiny experts, few requests (~1 min)
    python -m bench.serve --before /tmp/serve-before  # also another checkout's server (~12 min)

For each size (the quickstart's experts, and GPT-2 4x256 with a vocabulary of 8,192), a forest
of four experts is trained briefly by the real CLI on the shared corpus (routing needs
experts that differ). Three endpoints answer the same requests (a prompt from a domain's test
text, ``max_tokens`` new tokens, sampled at temperature 1): the forest's routed top-2 ensemble
and one of its experts alone, both from ``elmtrain serve`` (batched decoding), and that expert
behind ``bench/serve_baseline.py`` (``generate``, one request at a time). Each client sends its
requests back to back; tokens/s = completion tokens / wall time of the level; latency is each
request's, end to end.

``--before DIR`` also starts ``elmtrain serve`` from DIR's ``trainer_image`` and ``core`` (a
``git worktree`` of an older commit) on the same forest, and measures its routed top-2 forest
and one expert in the same rounds as the current server's (the two alternate, level by level):
the server before and after a change, with each level's ratio current / before (and each
round's). The older server must read the forest this one trains; scoring is measured on the
current server only (servers before eb30c26 have no ``echo`` or ``logprobs``).

Scoring: ``echo: true, max_tokens: 0, logprobs: 5`` requests to the routed forest, one text of
the context's length (token ids, from the domains' test text) at a time, against ``elmtrain
ensemble-eval --top-k 2`` on the same sequences (the server's forest scores as its ``top2``
row; both with a uniform prior), in seconds per scored token. The CLI's time includes starting
Python and loading the models; its time less that of a run on one sequence per domain is
reported too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, plot_path, table, write_results

COMMON = {
    "domains": ("code", "legal", "quotes", "scripture"),
    "train_steps": 30,
    "levels": ((1, 12), (8, 32), (32, 96)),  # (concurrent clients, requests in all)
    "max_tokens": 64,
    "prompt_chars": 120,
    "score_sequences": 16,  # per domain: texts scored by the server and by ensemble-eval
}
# Two sizes of expert: the quickstart's (what `elmforest serve -f examples/quickstart/` serves)
# and one with 5x the parameters per token, whose decoding is compute-bound on 2 CPU cores.
FULL = {
    "quickstart": {
        **COMMON,
        "model": {
            "family": "gpt2",
            "d_model": 128,
            "n_layers": 4,
            "n_heads": 4,
            "context_length": 128,
        },
        "vocab": 2048,
        "prompt_chars": 80,  # prompt and 64 new tokens within the 128-token context
    },
    "gpt2-4x256": {
        **COMMON,
        "model": {
            "family": "gpt2",
            "d_model": 256,
            "n_layers": 4,
            "n_heads": 4,
            "context_length": 256,
        },
        "vocab": 8192,
    },
}
QUICK = {
    "tiny": {
        "model": {
            "family": "gpt2",
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "context_length": 96,
        },
        "vocab": 512,
        "domains": ("code", "legal"),
        "train_steps": 5,
        "levels": ((1, 4), (4, 8)),
        "rounds": 1,
        "max_tokens": 16,
        "prompt_chars": 60,
        "score_sequences": 2,
    }
}
ROUTED, SINGLE, PLAIN = "elmforest routed top-2", "elmforest one expert", "plain generate loop"


def _forest(corpus: Path, scale: dict[str, Any], work: Path) -> Path:
    from bench.btm.recipes import elmtrain

    forest = work / "forest"
    train = [str(corpus / d / "train.txt") for d in scale["domains"]]
    elmtrain("tokenizer", "--forest", str(forest), "--vocab-size", str(scale["vocab"]),
             "--data", *train, "--merge")  # fmt: skip
    training = json.dumps(
        {
            "steps": scale["train_steps"],
            "batch_size": 8,
            "seq_len": min(128, scale["model"]["context_length"]),
            "warmup_steps": 2,
            "checkpoint_interval": 1000,
            "eval_batches": 1,
        }
    )
    elmtrain("seed", "--forest", str(forest), "--data", *train, "--model",
             json.dumps(scale["model"]), "--training", training, "--merge")  # fmt: skip
    for domain, data in zip(scale["domains"], train, strict=True):
        elmtrain("branch", "--forest", str(forest), "--domain", domain, "--data", data,
                 "--init", "seed", "--training", training, "--merge")  # fmt: skip
    return forest


def _prompts(corpus: Path, scale: dict[str, Any], count: int) -> list[str]:
    texts = [(corpus / d / "test.txt").read_text(errors="replace") for d in scale["domains"]]
    size = scale["prompt_chars"]
    return [texts[i % len(texts)][(i * 997) % 20_000 :][:size] for i in range(count)]


async def _level(
    url: str, model: str, prompts: list[str], clients: int, max_tokens: int
) -> dict[str, Any]:
    import aiohttp

    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    latencies: list[float] = []
    tokens = 0
    failures = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, failures
        while not queue.empty():
            seed, prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed}
            started = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as answer:
                data = await answer.json()
            if answer.status != 200:
                failures += 1
                continue
            latencies.append(time.perf_counter() - started)
            tokens += data["usage"]["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "p50_seconds": round(statistics.median(latencies), 3),
        "p99_seconds": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
    }


@contextlib.contextmanager
def _baseline(model: Path, tokenizer: Path, dtype: str, threads: str, log: Path) -> Iterator[str]:
    from tests.harness.controlplane import free_port
    from tests.harness.serve import Served

    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.serve_baseline",
                "--model",
                str(model),
                "--tokenizer",
                str(tokenizer),
                "--port",
                str(port),
                "--dtype",
                dtype,
                *([] if threads == "default" else ["--threads", threads]),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        Served(f"http://127.0.0.1:{port}", process, log).wait_revision(0)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def before_env(tree: Path) -> dict[str, str]:
    """The environment whose ``elmtrain`` and ``elmcore`` are the ones in ``tree``."""
    paths = [str(tree / "trainer_image"), str(tree / "core"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def check_before(tree: Path) -> str:
    """That ``tree``'s elmtrain is the one its environment imports; its commit."""
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "import elmtrain, elmcore; print(elmtrain.__file__, elmcore.__file__)",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **before_env(tree)},
        cwd=ROOT,
        check=True,
    ).stdout.split()
    if not all(Path(f).resolve().is_relative_to(tree) for f in found):
        raise SystemExit(f"--before {tree}: python imports {found}, not that tree's")
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return commit or "unknown"


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())


def _scoring(
    url: str, forest: Path, corpus: Path, scale: dict[str, Any], work: Path
) -> dict[str, Any]:
    """The routed forest's scoring requests against ``elmtrain ensemble-eval`` on the same
    sequences (see the module's notes); the better of the rounds for each."""
    from elmtrain.data.store import load_sequences
    from elmtrain.forest import Forest

    seq_len = int(scale["model"]["context_length"])
    per_domain = int(scale["score_sequences"])
    tests = {d: str(corpus / d / "test.txt") for d in scale["domains"]}
    store = Forest.open(str(forest)).token_store()
    texts = [
        ids
        for location in tests.values()
        for ids in load_sequences([location], store, seq_len, per_domain).tolist()
    ]

    def server() -> tuple[float, int, float]:
        started = time.perf_counter()
        scored, total = 0, 0.0
        for ids in texts:
            body = {"model": "forest", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 5}
            values = _post(url, body)["choices"][0]["logprobs"]["token_logprobs"]
            scored += sum(v is not None for v in values)
            total += sum(v for v in values if v is not None)
        return time.perf_counter() - started, scored, -total / scored

    def cli(count: int) -> tuple[float, int, float]:
        out = work / f"ensemble-eval-{count}.json"
        command = [sys.executable, "-m", "elmtrain", "ensemble-eval", "--forest", str(forest),
                   "--data", *(f"{d}={loc}" for d, loc in tests.items()),
                   "--seq-len", str(seq_len), "--max-sequences", str(count),
                   "--top-k", "2", "--out", str(out)]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        rows = [entry["top2"] for entry in json.loads(out.read_text())["domains"].values()]
        tokens = sum(int(r["tokens"]) for r in rows)
        return seconds, tokens, sum(r["loss"] * r["tokens"] for r in rows) / tokens

    runs: dict[str, list[tuple[float, int, float]]] = {"server": [], "cli": [], "tiny": []}
    server()  # warm: the scoring thread's first forward passes
    for _ in range(scale.get("rounds", 2)):  # the machine is shared: the best of the rounds
        runs["server"].append(server())
        runs["tiny"].append(cli(1))
        runs["cli"].append(cli(per_domain))
    (s_sec, s_tok, s_loss), (c_sec, c_tok, c_loss), (t_sec, t_tok, _) = (
        min(runs[k]) for k in ("server", "cli", "tiny")
    )
    server_per_token = s_sec / s_tok
    cli_per_token = c_sec / c_tok
    # Less the tiny run: none where start-up's spread exceeds the work (the tiny run slower).
    more = (c_sec - t_sec, c_tok - t_tok)
    loaded_per_token = more[0] / more[1] if more[0] > 0 and more[1] > 0 else None
    return {
        "texts": len(texts),
        "seq_len": seq_len,
        "server": {
            "seconds": round(s_sec, 3),
            "tokens": s_tok,
            "loss": round(s_loss, 4),
            "seconds_per_token": server_per_token,
        },
        "ensemble_eval": {
            "seconds": round(c_sec, 3),
            "tokens": c_tok,
            "loss": round(c_loss, 4),
            "seconds_per_token": cli_per_token,
        },
        "ensemble_eval_tiny": {"seconds": round(t_sec, 3), "tokens": t_tok},
        "ensemble_eval_loaded_seconds_per_token": loaded_per_token,
        "ratio_server_vs_ensemble_eval": round(server_per_token / cli_per_token, 3),
        "ratio_server_vs_ensemble_eval_loaded": (
            round(server_per_token / loaded_per_token, 3) if loaded_per_token else None
        ),
    }


def measure(
    corpus: Path, scale: dict[str, Any], work: Path, before: Path | None = None
) -> dict[str, Any]:
    import torch
    from tests.harness.serve import serving

    from elmtrain.forest import Forest
    from elmtrain.serving.modelset import serving_dtype

    forest = _forest(corpus, scale, work)
    opened = Forest.open(str(forest))
    expert = scale["domains"][0]
    expert_dir = opened.fetch(opened.manifest().expert(expert))
    tokenizer_dir = opened.fetch(opened.manifest().tokenizer)  # type: ignore[arg-type]
    # Both tools in the server's default dtype here (auto: float32 on CPUs).
    dtypes = [str(serving_dtype("auto", torch.device("cpu"))).removeprefix("torch.")]
    rows: dict[str, list[dict[str, Any]]] = {}
    rounds = int(scale.get("rounds", 2))

    def run_levels(endpoints: list[tuple[str, str, str]]) -> None:
        """Each (url, model, row) at each level, the endpoints taking turns within a level (a
        different one first each round); each row keeps its best round."""
        for url, model, _ in endpoints:  # warm
            asyncio.run(_level(url, model, _prompts(corpus, scale, 4), 1, scale["max_tokens"]))
        for *_, row in endpoints:
            rows[row] = []
        for clients, count in scale["levels"]:
            prompts = _prompts(corpus, scale, count)
            # The better of two rounds: the machine is shared, and the best is what it can do.
            runs: dict[str, list[dict[str, Any]]] = {row: [] for *_, row in endpoints}
            for round_ in range(rounds):
                shift = round_ % len(endpoints)
                for url, model, row in endpoints[shift:] + endpoints[:shift]:
                    level = asyncio.run(_level(url, model, prompts, clients, scale["max_tokens"]))
                    runs[row].append(level)
            for row, levels in runs.items():
                best = max(levels, key=lambda r: r["tokens_per_second"])
                best["rounds_tokens_per_second"] = [r["tokens_per_second"] for r in levels]
                rows[row].append(best)
                print(row, best, flush=True)

    scoring: dict[str, Any] = {}
    for dtype in dtypes:
        extra = ("--name", "forest", "--max-batch", "64", "--dtype", dtype)
        with serving(str(forest), work, *extra) as served:
            endpoints = {ROUTED: "forest", SINGLE: f"forest/expert/{expert}"}
            urls = [(served.url, "")]
            with contextlib.ExitStack() as peer:
                if before is not None:
                    env = before_env(before)
                    old = peer.enter_context(serving(str(forest), work, *extra, env=env))
                    urls.append((old.url, ", before"))
                for kind, model in endpoints.items():
                    run_levels([(url, model, f"{kind} ({dtype}{tag})") for url, tag in urls])
            # Scoring (its peer stopped) in the server's default dtype (float32 on CPUs).
            if dtype == dtypes[0]:
                scoring = _scoring(served.url, forest, corpus, scale, work)
        # The loop as a user runs it, with torch's own threads and with one (a small model at
        # batch 1 can lose more to threading than it gains): the faster counts.
        for threads in ("default", "1"):
            log = work / f"baseline-{threads}.log"
            with _baseline(expert_dir, tokenizer_dir, dtype, threads, log) as url:
                run_levels([(url, "baseline", f"{PLAIN} ({dtype}, threads {threads})")])
        candidates = [r for r in rows if r.startswith(f"{PLAIN} ({dtype}")]
        rows[f"{PLAIN} ({dtype})"] = max(
            (rows[r] for r in candidates), key=lambda levels: levels[-1]["tokens_per_second"]
        )
    top = scale["levels"][-1][0]

    def at_top(row: str) -> float:
        return float(rows[row][-1]["tokens_per_second"])

    best = dtypes[0]
    results: dict[str, Any] = {
        "scale": scale,
        "dtypes": dtypes,
        "rows": rows,
        # The server as it runs by default against the loop as a user would write it (float32).
        "ratio_routed_vs_plain": round(
            at_top(f"{ROUTED} ({best})") / at_top(f"{PLAIN} (float32)"), 2
        ),
        "ratios": {
            dtype: {
                "routed_vs_plain": round(
                    at_top(f"{ROUTED} ({dtype})") / at_top(f"{PLAIN} ({dtype})"), 2
                ),
                "single_vs_plain": round(
                    at_top(f"{SINGLE} ({dtype})") / at_top(f"{PLAIN} ({dtype})"), 2
                ),
            }
            for dtype in dtypes
        },
        "top_clients": top,
        "scoring": scoring,
    }
    if before is not None:
        # Per endpoint and level: tokens/s now and before, and current / before (the best
        # rounds', and each round's own: a round's two runs were back to back).
        results["before"] = {
            dtype: {
                kind: [
                    {
                        "clients": now["clients"],
                        "current": now["tokens_per_second"],
                        "before": then["tokens_per_second"],
                        "ratio": round(now["tokens_per_second"] / then["tokens_per_second"], 3),
                        "round_ratios": [
                            round(a / b, 3)
                            for a, b in zip(
                                now["rounds_tokens_per_second"],
                                then["rounds_tokens_per_second"],
                                strict=True,
                            )
                        ],
                    }
                    for now, then in zip(
                        rows[f"{kind} ({dtype})"], rows[f"{kind} ({dtype}, before)"], strict=True
                    )
                ]
                for kind in (ROUTED, SINGLE)
            }
            for dtype in dtypes
        }
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    figure, axes = plt.subplots(len(sizes), 2, figsize=(12, 4.5 * len(sizes)), squeeze=False)
    for (rate, tail), (size, measured) in zip(axes, sizes.items(), strict=True):
        for row, levels in measured["rows"].items():
            clients = [level["clients"] for level in levels]
            rate.plot(clients, [level["tokens_per_second"] for level in levels], "-o", label=row)
            tail.plot(clients, [level["p99_seconds"] for level in levels], "-o", label=row)
        rate.set(xlabel="concurrent clients", ylabel="completion tokens / s")
        rate.set_title(f"{size}: throughput")
        tail.set(xlabel="concurrent clients", ylabel="p99 latency (s)")
        tail.set_title(f"{size}: tail latency")
        for axis in (rate, tail):
            axis.set_xscale("log", base=2)
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    cli.add_argument("--domains", help="comma-separated domains of the experts")
    cli.add_argument("--before", type=Path, help="another checkout's server, measured alongside")
    args = cli.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    before = args.before.resolve() if args.before else None
    results: dict[str, Any] = {"sizes": {}}
    if before is not None:
        results["before"] = {"tree": str(before), "commit": check_before(before)}
    for size, preset in sizes.items():
        scale = dict(preset)
        if args.domains:
            scale["domains"] = tuple(args.domains.split(","))
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            results["sizes"][size] = measure(args.corpus, scale, Path(tmp), before)
    path = write_results("serve", results, args)
    plot(results, plot_path("serve", args))
    for size, measured in results["sizes"].items():
        print(f"\n{size}:")
        print(
            table(
                ["endpoint", "clients", "tokens/s", "p50 s", "p99 s", "requests"],
                [
                    [
                        row,
                        lv["clients"],
                        lv["tokens_per_second"],
                        lv["p50_seconds"],
                        lv["p99_seconds"],
                        lv["requests"],
                    ]
                    for row, levels in measured["rows"].items()
                    for lv in levels
                ],
            )
        )
        top, ratio = measured["top_clients"], measured["ratio_routed_vs_plain"]
        print(f"routed top-2 / plain loop at {top} clients: {ratio}x")
        if before is not None:
            commit = results["before"]["commit"]
            print(f"\n{size}: this checkout against {commit} (tokens/s, same rounds):")
            print(
                table(
                    ["endpoint", "clients", "current", "before", "current/before", "per round"],
                    [
                        [
                            f"{kind} ({dtype})",
                            lv["clients"],
                            lv["current"],
                            lv["before"],
                            lv["ratio"],
                            " ".join(str(r) for r in lv["round_ratios"]),
                        ]
                        for dtype, kinds in measured["before"].items()
                        for kind, levels in kinds.items()
                        for lv in levels
                    ],
                )
            )
        scored = measured["scoring"]
        loaded = scored["ensemble_eval_loaded_seconds_per_token"]
        print(
            f"\n{size}: scoring {scored['texts']} texts of {scored['seq_len']} tokens "
            "(logprobs 5, echo, max_tokens 0) against ensemble-eval --top-k 2:"
        )
        print(
            table(
                ["scorer", "seconds", "tokens", "ms/token", "loss", "server / this"],
                [
                    [
                        f"{ROUTED}: one request per text",
                        scored["server"]["seconds"],
                        scored["server"]["tokens"],
                        1000 * scored["server"]["seconds_per_token"],
                        scored["server"]["loss"],
                        "",
                    ],
                    [
                        "elmtrain ensemble-eval (process start and model loading included)",
                        scored["ensemble_eval"]["seconds"],
                        scored["ensemble_eval"]["tokens"],
                        1000 * scored["ensemble_eval"]["seconds_per_token"],
                        scored["ensemble_eval"]["loss"],
                        scored["ratio_server_vs_ensemble_eval"],
                    ],
                    [
                        "elmtrain ensemble-eval, less a run on 1 text per domain "
                        f"({scored['ensemble_eval_tiny']['seconds']} s)",
                        "",
                        "",
                        "n/a (start-up's spread > the work)" if loaded is None else 1000 * loaded,
                        "",
                        scored["ratio_server_vs_ensemble_eval_loaded"] or "n/a",
                    ],
                ],
            )
        )
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()

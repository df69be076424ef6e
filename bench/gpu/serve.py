"""``elmtrain serve`` on a GPU: completion tokens/s at 1 and 32 concurrent clients.

    python -m bench.gpu.serve --out serve.json            # GPT-2 4x256 experts, ~1-2 min on a GPU
    python -m bench.gpu.serve --smoke --out serve.json    # tiny experts, fewer requests (CPU)

A forest of four experts is trained briefly by the real CLI (``tokenizer``, ``seed``,
``branch``, as ``bench.serve`` does) on synthetic domains (``tests/textgen.py``: the shared
corpus does not travel to a GPU machine); ``elmtrain serve`` then answers prompts from the
domains' held-out text (``max_tokens`` new tokens, temperature 1) on the routed top-2 forest
and on one expert alone, in the server's default dtype (bf16 on a GPU). Each client sends its
requests back to back; tokens/s = completion tokens / the level's wall time (``bench.serve``'s
``_level``). Routing on synthetic domains is easy: the figures measure the server's batched
decoding, not the experts' quality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, table
from bench.serve import _forest, _level

DOMAINS = ("cooking", "sailing", "finance", "poetry")
GPU = {
    "domains": DOMAINS,
    "train_docs": 400,
    "model": {"family": "gpt2", "d_model": 256, "n_layers": 4, "n_heads": 4, "context_length": 256},
    "vocab": 2048,
    "train_steps": 30,
    "levels": ((1, 8), (32, 128)),  # (concurrent clients, requests in all)
    "max_tokens": 64,
    "prompt_chars": 80,
}
SMOKE = {
    **GPU,
    "domains": DOMAINS[:2],
    "train_docs": 60,
    "model": {"family": "gpt2", "d_model": 32, "n_layers": 1, "n_heads": 2, "context_length": 96},
    "vocab": 512,
    "train_steps": 3,
    "levels": ((1, 2), (32, 32)),
    "max_tokens": 8,
}


# The table's columns after the endpoint: keys of ``_level``'s answer.
COLUMNS = ("clients", "tokens_per_second", "p50_seconds", "p99_seconds", "requests", "failures")


def _prompts(corpus: Path, scale: dict[str, Any], count: int) -> list[str]:
    texts = [(corpus / d / "valid.txt").read_text() for d in scale["domains"]]
    size = scale["prompt_chars"]
    return [
        texts[i % len(texts)][(i * 997) % max(1, len(texts[i % len(texts)]) - size) :][:size]
        for i in range(count)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"elmtrain serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=10) as answer:
                if answer.status == 200 and json.loads(answer.read()).get("revision", -1) >= 0:
                    return
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"elmtrain serve not ready in {timeout} s: {log.read_text()[-3000:]}")


def measure(scale: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    from tests.textgen import write_domains

    corpus = write_domains(work / "corpus", list(scale["domains"]), scale["train_docs"], 40)
    started = time.perf_counter()
    forest = _forest(corpus, scale, work)
    build_seconds = time.perf_counter() - started
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "elmtrain", "serve", "--forest", str(forest),
               "--host", "127.0.0.1", "--port", str(port), "--name", "forest",
               "--max-batch", "64"]  # fmt: skip
    rows: dict[str, list[dict[str, Any]]] = {}
    with log.open("ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        started = time.perf_counter()
        _wait_ready(url, process, log, 180)
        ready_seconds = time.perf_counter() - started
        endpoints = {"routed top-2": "forest", "one expert": f"forest/expert/{scale['domains'][0]}"}
        for row, model in endpoints.items():
            warm = _prompts(corpus, scale, 4)
            asyncio.run(_level(url, model, warm, 1, scale["max_tokens"]))
            rows[row] = []
            for clients, count in scale["levels"]:
                prompts = _prompts(corpus, scale, count)
                level = asyncio.run(_level(url, model, prompts, clients, scale["max_tokens"]))
                print(row, json.dumps(level), flush=True)
                rows[row].append(level)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return {
        "forest_build_seconds": round(build_seconds, 1),
        "server_ready_seconds": round(ready_seconds, 1),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--smoke", action="store_true", help="tiny experts, few requests")
    cli.add_argument("--out", type=Path, help="results JSON (default: print only)")
    args = cli.parse_args(argv)
    scale = SMOKE if args.smoke else GPU
    out = args.out or Path(tempfile.gettempdir()) / "bench-gpu-serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_bytes(b"")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-serve-") as tmp:
        measured = measure(scale, Path(tmp), log)
    import transformers

    versions = {"transformers": transformers.__version__}
    results = {"machine": machine(), **versions, "scale": scale, **measured}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        table(
            ["endpoint", "clients", "tokens/s", "p50 s", "p99 s", "requests", "failures"],
            [
                [row, *(lv[k] for k in COLUMNS)]
                for row, levels in measured["rows"].items()
                for lv in levels
            ],
        )
    )
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()

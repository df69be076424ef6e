"""The baseline of ``bench.serve``: what one would write without elmforest's server.

A plain HTTP endpoint around ``transformers``' ``generate``: one model, one request at a time
(a lock), the same completions request and response shapes, so the same load generator drives
both. Run by the benchmark as ``python -m bench.serve_baseline --model DIR --tokenizer DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web


def build_app(model_dir: Path, tokenizer_dir: Path, dtype: str) -> web.Application:
    import torch
    from transformers import AutoModelForCausalLM

    from elmtrain.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    eos = int(tokenizer.eos_token_id)
    lock = asyncio.Lock()

    def generate(body: dict[str, Any]) -> tuple[str, int, int]:
        ids = [eos, *tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]]
        torch.manual_seed(int(body.get("seed") or 0))
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=int(body.get("max_tokens") or 16),
                do_sample=True,
                temperature=float(body.get("temperature", 1.0)),
                top_k=0,
                pad_token_id=eos,
                eos_token_id=eos,
            )
        new = out[0, len(ids) :].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        return str(tokenizer.decode(new)), len(ids) - 1, len(new)

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        async with lock:  # one request at a time, as a plain generate loop serves them
            text, prompt_tokens, completion_tokens = await asyncio.to_thread(generate, body)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}
        return web.json_response({"object": "text_completion", "choices": [choice], "usage": usage})

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True, "revision": 0})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/readyz", ready)
    app.router.add_get("/healthz", ready)
    return app


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--model", type=Path, required=True)
    cli.add_argument("--tokenizer", type=Path, required=True)
    cli.add_argument("--host", default="127.0.0.1")
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    cli.add_argument("--threads", type=int, help="torch's threads (default: torch's own)")
    args = cli.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = build_app(args.model, args.tokenizer, args.dtype)
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

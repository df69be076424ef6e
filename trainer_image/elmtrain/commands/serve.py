"""``elmtrain serve``: the forest behind OpenAI's completions API (elmtrain/serving/)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from elmcore.errors import BadInputError
from elmcore.names import validate_label
from elmcore.uris import StorageURI
from elmtrain.clusters.routing import DEFAULT_TEMPERATURE
from elmtrain.commands.common import add_forest_args, open_forest

if TYPE_CHECKING:
    from elmtrain.serving.app import Server

log = structlog.get_logger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("serve", help="serve the forest (OpenAI-compatible completions)")
    add_forest_args(parser)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", help="the ensemble's model name (default: the forest's)")
    parser.add_argument("--top-k", type=int, default=2, help="experts that generate per request")
    parser.add_argument(
        "--routing",
        choices=["posterior", "clusters"],
        default="posterior",
        help="what picks and weighs the experts of a request that does not say "
        "(elmforest.routing): the prompt's posterior, or its cluster weights (c-BTM; the "
        "posterior while the experts cannot be routed by cluster)",
    )
    parser.add_argument(
        "--cluster-temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"routing by cluster: softmax temperature (default {DEFAULT_TEMPERATURE}, c-BTM's)",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="sequences decoding at once")
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests (and prompts) in flight beyond --max-batch, then 429",
    )
    parser.add_argument(
        "--max-concurrent-per-key",
        type=int,
        default=None,
        help="requests in flight per client (bearer token, else address); default: no limit",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take, answered or refused",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help="API keys, one per line: every request but the probes and /metrics needs "
        "'Authorization: Bearer <key>' (default: no authentication)",
    )
    parser.add_argument(
        "--exclude-experts",
        nargs="*",
        default=[],
        metavar="DOMAIN",
        help="experts this endpoint never loads or serves (their data owners opted out); "
        "requests may exclude more (elmforest.experts)",
    )
    parser.add_argument("--lanes", type=int, default=None, help="models stepped at once (cores)")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="manifest checks")
    parser.add_argument(
        "--prior-data", nargs="*", default=[], help="text like the expected traffic: the prior"
    )
    parser.add_argument(
        "--report-as",
        default=os.environ.get("ELMTRAIN_REPLICA"),
        help="write serving/<name>.json to the forest (the operator reads it)",
    )
    parser.add_argument("--grace-seconds", type=float, default=20.0, help="drain on SIGTERM")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="weights: auto is bfloat16 on a GPU that has it, else float32",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.top_k < 1 or args.max_batch < 1 or args.max_waiting < 1 or args.poll_seconds <= 0:
        raise BadInputError("serve: --top-k, --max-batch, --max-waiting and --poll-seconds >= 1")
    per_key = args.max_concurrent_per_key
    if (per_key is not None and per_key < 1) or args.request_timeout <= 0:
        raise BadInputError("serve: --max-concurrent-per-key >= 1 and --request-timeout > 0")
    if not 0 < args.cluster_temperature < float("inf"):
        raise BadInputError(f"serve: --cluster-temperature {args.cluster_temperature}: > 0")
    from elmtrain.serving.auth import ApiKeys

    # Bad keys and names fail before any model loads.
    api_keys = ApiKeys.load(args.api_key_file) if args.api_key_file else None
    excluded = [validate_label(d, "--exclude-experts") for d in args.exclude_experts]
    # torch, transformers and aiohttp: only when it runs (see elmtrain.cli).
    import torch

    from elmtrain.runtime import setup_runtime
    from elmtrain.serving.admission import Admission
    from elmtrain.serving.app import Server, ServingState
    from elmtrain.serving.engine import Engine
    from elmtrain.serving.follow import Follower
    from elmtrain.serving.metrics import ServeMetrics
    from elmtrain.serving.modelset import serving_dtype

    forest = open_forest(args)
    name = args.name or StorageURI.parse(args.forest).name or "forest"
    runtime = setup_runtime()
    torch.set_grad_enabled(False)
    metrics = ServeMetrics()
    state = ServingState()
    engine = Engine(args.top_k, args.max_batch, metrics.engine_hook, args.lanes)
    in_flight = args.max_batch + args.max_waiting  # requests, and prompts, at once
    admission = Admission(in_flight, in_flight, per_key)
    dtype = serving_dtype(args.dtype, runtime.device)
    follower = Follower(
        forest,
        name,
        runtime,
        state,
        metrics,
        args.poll_seconds,
        args.prior_data,
        args.report_as,
        dtype=dtype,
        excluded=excluded,
    )
    log.info("serve.dtype", dtype=str(dtype).removeprefix("torch."))
    engine.start()
    follower.start()
    try:
        asyncio.run(
            _serve(
                Server(
                    engine,
                    state,
                    metrics,
                    admission,
                    args.request_timeout,
                    api_keys,
                    args.routing,
                    args.cluster_temperature,
                ),
                args.host,
                args.port,
                args.grace_seconds,
            )
        )
    finally:
        follower.stop()
        engine.stop()


async def _serve(server: Server, host: str, port: int, grace: float) -> None:
    from aiohttp import web

    # handler_cancellation: a client that disconnects cancels its handler, which stops its
    # completions at the engine's next step (streaming or not).
    runner = web.AppRunner(server.app(), shutdown_timeout=grace, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("serve.listening", host=host, port=port)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    log.info("serve.stopping", grace_seconds=grace)
    await runner.cleanup()  # stops accepting, lets in-flight requests finish (up to grace)

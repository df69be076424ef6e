"""``elmforest``: train a forest on this machine, run the operator, or print the CRDs.

``elmforest up -f DIR`` runs the operator's planners locally (trainer Jobs as processes),
``elmforest serve -f DIR`` serves what it trained (OpenAI's completions API);
``elmforest operator`` wraps ``kopf run`` with this project's defaults: Kopf's peering off,
optionally behind a Lease-based leader election (``--leader-election``; see leadership.py),
a liveness endpoint, Prometheus metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from elmcore.errors import ElmError
from elmcore.logs import configure_logging

if TYPE_CHECKING:
    from elmforest.local.commands import Options


def _operator(args: argparse.Namespace) -> int:
    import kopf

    os.environ["ELMFOREST_RESYNC_SECONDS"] = str(args.resync)
    os.environ["ELMFOREST_METRICS_PORT"] = str(args.metrics_port)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr)
    import elmforest.handlers  # noqa: F401  (registers the handlers)

    namespaces = args.namespace or []
    elector = None
    if args.leader_election:
        from elmforest.adapters.kube import load_config
        from elmforest.leadership import ElectionSettings, Elector, standby_health

        load_config()
        elector = Elector(
            ElectionSettings(
                name=args.lease_name,
                namespace=args.lease_namespace,
                identity=args.identity,
                lease_duration=args.lease_duration,
                renew_deadline=args.renew_deadline,
                retry_period=args.retry_period,
            )
        )
        health = standby_health(args.liveness) if args.liveness else None
        elector.acquire()  # the standby blocks here, reading only the Lease
        if health is not None:
            health.shutdown()
            health.server_close()
        elector.start_renewing()
    try:
        kopf.run(
            standalone=args.peering is None,
            peering_name=args.peering,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
        )
    finally:
        # Kopf returns after a SIGTERM has stopped its handlers: only then is it safe to hand
        # the Lease over at once (a crash never gets here: the Lease then expires).
        if elector is not None:
            elector.release()
    return 0


def _crds(args: argparse.Namespace) -> int:
    from elmforest.api import crds

    if args.write:
        for path in crds.write(Path(args.write)):
            sys.stdout.write(f"wrote {path}\n")
    else:
        sys.stdout.write("---\n".join(crds.files().values()))
    return 0


def _chart(args: argparse.Namespace) -> int:
    from elmforest import chart

    for path in chart.write(Path(args.write)):
        sys.stdout.write(f"wrote {path}\n")
    return 0


def _local(args: argparse.Namespace) -> int:
    from elmforest.local import commands

    paths = [Path(p) for p in args.file]
    options = commands.Options(
        paths=paths,
        state_dir=Path(args.state_dir) if args.state_dir else commands.default_state_dir(paths),
        parallel=getattr(args, "parallel", None) or commands.default_parallel(),
        poll_seconds=getattr(args, "poll", 1.0),
        timeout_seconds=getattr(args, "timeout", None),
        report=not getattr(args, "no_report", False),
        top_k=getattr(args, "top_k", 2),
        force_report=getattr(args, "force", False),
    )
    if args.command == "serve":  # a server's log is its output: it stays on stderr
        return _run_local(
            "serve",
            lambda o, out: commands.serve(o, out, args.forest, args.host, args.port),
            options,
        )
    if args.command == "report" and args.lineage:
        return _run_local(
            "report", lambda o, out: commands.lineage(o, args.forest, args.lineage), options
        )
    run = {"up": commands.up, "down": commands.down, "report": commands.report}[args.command]
    # The screen shows the progress table; this process's own log goes to a file beside it.
    options.state_dir.mkdir(parents=True, exist_ok=True)
    with (options.state_dir / "elmforest.log").open("a") as log:
        configure_logging(args.log_level, stream=log, fmt="console")
        return _run_local(args.command, run, options)


def _run_local(command: str, run: Callable[[Options, TextIO], int], options: Options) -> int:
    try:
        return run(options, sys.stdout)
    except ElmError as error:
        sys.stderr.write(f"elmforest {command}: error: {error}\n")
        return int(error.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write(f"elmforest {command}: interrupted\n")
        return 130


def _add_local(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="train the forest in these files on this machine")
    down = sub.add_parser("down", help="remove these files' branches (and forests) locally")
    report = sub.add_parser("report", help="perplexity table and plot of a local forest")
    serve = sub.add_parser("serve", help="serve a local forest (OpenAI-compatible completions)")
    for parser in (up, down, report, serve):
        parser.add_argument(
            "-f",
            "--file",
            action="append",
            required=True,
            help="YAML file or folder of ElmForest / ElmBranch (repeatable)",
        )
        parser.add_argument("--state-dir", help="default: .elmforest/ beside the first file")
        parser.set_defaults(func=_local)
    up.add_argument("--parallel", type=int, help="trainer processes at once (default: cores, <=4)")
    up.add_argument("--poll", type=float, default=1.0, help="seconds between checks")
    up.add_argument("--timeout", type=float, help="stop (resumably) after this many seconds")
    up.add_argument("--no-report", action="store_true", help="skip the report at the end")
    for parser in (up, report, serve):
        parser.add_argument("--top-k", type=int, default=2, help="the sparse ensemble's k")
    report.add_argument("--force", action="store_true", help="recompute even if up to date")
    report.add_argument(
        "--lineage", metavar="EXPERT", help="print what made EXPERT (a domain, or 'seed') instead"
    )
    for parser in (report, serve):
        parser.add_argument("--forest", help="which forest (default: the files' only one)")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    serve.add_argument("--port", type=int, default=8000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elmforest", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("ELMFOREST_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_local(sub)

    op = sub.add_parser("operator", help="run the Kubernetes operator")
    op.add_argument(
        "--namespace",
        "-n",
        action="append",
        help="watch this namespace (repeatable; glob patterns allowed); default: all namespaces",
    )
    op.add_argument("--peering", default=None, help="Kopf peering name (default: off)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="'' disables")
    op.add_argument("--metrics-port", type=int, default=9090, help="0 disables")
    op.add_argument("--resync", type=float, default=15.0, help="seconds between re-checks")
    env = os.environ.get
    op.add_argument(
        "--leader-election",
        action="store_true",
        default=env("ELMFOREST_LEADER_ELECTION", "") == "true",
        help="act only while holding a coordination.k8s.io Lease (for several replicas)",
    )
    op.add_argument("--lease-name", default=env("ELMFOREST_LEASE_NAME", "elmforest-operator"))
    op.add_argument("--lease-namespace", default=env("POD_NAMESPACE", "default"))
    op.add_argument("--identity", default=env("POD_NAME", ""), help="default: $POD_NAME")
    op.add_argument("--lease-duration", type=float, default=15.0, help="seconds")
    op.add_argument("--renew-deadline", type=float, default=10.0, help="seconds")
    op.add_argument("--retry-period", type=float, default=2.0, help="seconds")
    op.set_defaults(func=_operator)

    crd = sub.add_parser("crds", help="print the CRDs (or --write them to a folder)")
    crd.add_argument("--write", metavar="DIR")
    crd.set_defaults(func=_crds)

    gen = sub.add_parser("chart", help="regenerate the Helm chart's schema, RBAC rules and CRDs")
    gen.add_argument("--write", metavar="CHART_DIR", required=True)
    gen.set_defaults(func=_chart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args))

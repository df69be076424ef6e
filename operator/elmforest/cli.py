"""``elmforest``: run the operator, or print the CRDs.

``elmforest operator`` wraps ``kopf run`` with this project's defaults: peering off (one
replica; the Deployment uses the Recreate strategy), a liveness endpoint, Prometheus metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from elmcore.logs import configure_logging


def _operator(args: argparse.Namespace) -> int:
    import kopf

    os.environ["ELMFOREST_RESYNC_SECONDS"] = str(args.resync)
    os.environ["ELMFOREST_METRICS_PORT"] = str(args.metrics_port)
    os.environ["ELMFOREST_NAMESPACED"] = "1" if args.namespace else "0"
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr)
    import elmforest.handlers  # noqa: F401  (registers the handlers)

    namespaces = args.namespace or []
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0


def _crds(args: argparse.Namespace) -> int:
    from elmforest.api import crds

    if args.write:
        for path in crds.write(Path(args.write)):
            sys.stdout.write(f"wrote {path}\n")
    else:
        sys.stdout.write("---\n".join(crds.files().values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elmforest", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("ELMFOREST_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    op.set_defaults(func=_operator)

    crd = sub.add_parser("crds", help="print the CRDs (or --write them to a folder)")
    crd.add_argument("--write", metavar="DIR")
    crd.set_defaults(func=_crds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args))

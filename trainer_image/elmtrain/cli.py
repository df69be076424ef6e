"""``elmtrain``: one entry point, one subcommand per BTM step.

Exit codes (``elmcore.errors.ExitCode``): 0 done; 2 bad command line; 65 bad input (permanent:
retrying cannot help); 75 transient fault or preemption (retry); 1 an unexpected error (a bug).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import structlog

from elmcore.errors import ElmError, ExitCode
from elmcore.logs import configure_logging
from elmtrain.run.progress import write_termination_message

# Command name -> module. Only the command being run is imported, and a command module imports
# torch, transformers and the tokenizers inside its ``run`` only, once it has work for them:
# ``--help`` imports every module, so one heavy import at a module's top would cost every
# command about 7 s (tests/trainer/test_imports.py keeps them out; bench/cli.py measures).
COMMANDS = {
    "tokenizer": "tokenizer",
    "prepare": "prepare",
    "seed": "seed",
    "branch": "branch",
    "merge": "merge",
    "eval": "evaluate",
    "posterior": "posterior",
    "ensemble-eval": "ensemble_eval",
    "average": "average",
    "mix": "mix",
    "mix-train": "mix_train",
    "mix-forest": "mix_forest",
    "generate": "generate",
    "report": "report",
    "lineage": "lineage",
    "serve": "serve",
    "cluster-fit": "cluster_fit",
    "cluster-assign": "cluster_assign",
    "assign": "assign",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (``only``) just one command's part of it."""
    parser = argparse.ArgumentParser(prog="elmtrain", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("ELMFOREST_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only in (None, name):
            importlib.import_module(f"elmtrain.commands.{module}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The first word naming a command picks it (``--log-level``'s value never does).
    chosen = next((word for word in argv if word in COMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    configure_logging(args.log_level)
    log = structlog.get_logger("elmtrain")
    try:
        args.func(args)
    except ElmError as error:
        # One clear line for the user and for the Job's termination message.
        kind = "transient" if error.exit_code is ExitCode.TRANSIENT else "error"
        message = f"elmtrain {args.command}: {kind}: {error}"
        sys.stderr.write(message + "\n")
        write_termination_message(message)
        return int(error.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.TRANSIENT)
    except Exception as error:
        log.exception("elmtrain.crashed", command=args.command)
        write_termination_message(f"elmtrain {args.command}: internal error: {error!r}")
        return int(ExitCode.INTERNAL)
    write_termination_message(f"elmtrain {args.command}: ok")
    return int(ExitCode.OK)

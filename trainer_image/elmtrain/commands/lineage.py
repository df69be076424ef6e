"""``elmtrain lineage``: what made an expert (or the seed), as a tree down to the seed."""

from __future__ import annotations

import argparse
import sys

from elmcore import layout
from elmcore.errors import NotFoundError
from elmcore.lineage import lineage_tree
from elmcore.names import SEED_RUN_ID, branch_run_id
from elmcore.records import Result
from elmtrain.commands.common import add_forest_args, open_forest
from elmtrain.forest import Forest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("lineage", help="what made an expert: data, config, parents, image")
    add_forest_args(parser)
    parser.add_argument("name", help="an expert's domain, or 'seed'")
    parser.add_argument("--json", action="store_true", help="the result record as JSON")
    parser.set_defaults(func=run)


def run_result(forest: Forest, kind: str, domain: str | None, version: int | None) -> Result | None:
    """The stored result of the run that made this seed or expert version."""
    if kind == "seed":
        run_id = SEED_RUN_ID
    elif domain is not None and version is not None:
        run_id = branch_run_id(domain, version)
    else:
        return None
    try:
        return Result.model_validate_json(forest.storage.read_bytes(layout.run_result(run_id)))
    except NotFoundError:
        return None


def current(forest: Forest, name: str) -> Result:
    """The result of the seed or the merged expert ``name`` (NotFoundError: none such)."""
    manifest = forest.manifest()
    if name == "seed":
        found = run_result(forest, "seed", None, None)
    else:
        entry = manifest.expert(name)
        found = run_result(forest, "expert", entry.domain, entry.version)
    if found is None:
        raise NotFoundError(f"no stored result for {name}: its run records are gone")
    return found


def run(args: argparse.Namespace) -> Result:
    forest = open_forest(args)
    result = current(forest, args.name)
    if args.json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
        return result

    def lookup(kind: str, domain: str | None, version: int | None) -> Result | None:
        return run_result(forest, kind, domain, version)

    sys.stdout.write("\n".join(lineage_tree(result, lookup)) + "\n")
    return result

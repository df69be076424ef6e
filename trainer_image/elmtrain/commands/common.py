"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from elmcore.errors import BadInputError
from elmcore.names import validate_label
from elmcore.storage import open_storage
from elmcore.uris import StorageURI
from elmtrain.config import TrainingConfig, load_json_arg, parse_config
from elmtrain.forest import Forest


def add_forest_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forest", required=True, help="forest root: s3://bucket/prefix or a path")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    parser.add_argument("--s3-region", default=None, help="S3 region")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--training", help="TrainingConfig as JSON, or @file.json")
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.add_argument("--seed", type=int, dest="random_seed", help="override training.seed")
    parser.add_argument("--merge", action="store_true", help="merge the result into the manifest")


def open_forest(args: argparse.Namespace) -> Forest:
    return Forest.open(args.forest, endpoint=args.s3_endpoint, region=args.s3_region)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    data = load_json_arg(args.training, "--training")
    if args.steps is not None:
        data["steps"] = args.steps
    if args.random_seed is not None:
        data["seed"] = args.random_seed
    return parse_config(TrainingConfig, data, "--training")


def domain_locations(items: list[str]) -> dict[str, str]:
    """``domain=location`` pairs; a bare location is named after its last path segment."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, location = item.partition("=")
        if not sep or "://" in name:
            location, name = item, StorageURI.parse(item).name.split(".", 1)[0]
        named[validate_label(name, "domain")] = location
    return named


def write_output(data: Any, out: str | None, endpoint: str | None) -> None:
    """Print JSON on stdout, and also store it at ``out`` when given."""
    text = json.dumps(data, indent=2, sort_keys=True)
    sys.stdout.write(text + "\n")
    if out:
        open_storage(out, endpoint=endpoint).write_bytes("", text.encode())


def parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise BadInputError(f"weights: {item!r} is not name=number") from None
        if not sep:
            raise BadInputError(f"weights: {item!r} is not name=number")
    return weights

"""``elmtrain seed``: train the seed LM on the mixed corpus, or start from given weights."""

from __future__ import annotations

import argparse

from elmcore import layout
from elmcore.errors import BadInputError
from elmcore.names import SEED_RUN_ID
from elmcore.records import Result
from elmtrain.commands.common import (
    add_forest_args,
    add_training_args,
    open_forest,
    training_config,
)
from elmtrain.config import ModelConfig, load_json_arg, parse_config
from elmtrain.forest import Forest
from elmtrain.run.outcome import failure_recorded, finish_if_done
from elmtrain.run.spec import JobSpec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("seed", help="train the seed LM (or import pretrained weights)")
    add_forest_args(parser)
    parser.add_argument("--data", nargs="*", default=[], help="mixed-corpus text locations")
    parser.add_argument("--val-data", nargs="*", default=[], help="validation text locations")
    parser.add_argument("--model", help="ModelConfig as JSON, or @file.json")
    parser.add_argument("--pretrained", help="HF model folder to start from instead")
    add_training_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Result:
    forest = open_forest(args)
    with failure_recorded(forest, SEED_RUN_ID):
        return _train(args, forest)


def _train(args: argparse.Namespace, forest: Forest) -> Result:
    cfg = training_config(args)
    spec = JobSpec(
        kind="seed",
        run_id=SEED_RUN_ID,
        out_key=layout.SEED,
        train_data=args.data,
        val_data=args.val_data,
        training=cfg,
        merge=args.merge,
        pretrained=args.pretrained,
    )
    previous = finish_if_done(forest, spec)
    if previous is not None:
        return previous
    # torch and transformers from here on: a rerun of a finished seed never imports them.
    from elmtrain.model.families import build_model, check_trainable, check_vocab
    from elmtrain.run.jobs import run_training_job
    from elmtrain.run.parallel import place, placed
    from elmtrain.run.sharded_load import open_model
    from elmtrain.runtime import setup_runtime

    runtime = setup_runtime(cfg)
    tokenizer = forest.tokenizer()
    if args.pretrained:
        # Under fsdp each rank reads only its own shards of the weights (run/sharded_load.py).
        model = open_model(forest.model_dir(args.pretrained))
        check_vocab(model, len(tokenizer), f"--pretrained {args.pretrained}")
        model = place(model, cfg, runtime)
        parallel = placed(model)
        assert parallel is not None
        check_trainable(model, f"--pretrained {args.pretrained}", loss=parallel.engine)
    else:
        model_cfg = parse_config(ModelConfig, load_json_arg(args.model, "--model"), "--model")
        model = build_model(model_cfg, len(tokenizer), int(tokenizer.eos_token_id), cfg.seed)
    if cfg.steps > 0 and not args.data:
        raise BadInputError("seed: --data is required when training steps > 0")
    return run_training_job(forest, spec, model, runtime)

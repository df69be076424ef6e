"""Training from a prepared corpus, for ``bench.data``: the quickstart's model, ``--steps`` steps
of ``elmtrain``'s own loop, reading sequences from the shards (or, ``--in-memory``, from the
same kind of text held in memory as one tensor). Writes ``<forest>/bench-train.json``: seconds
from the start of this process to the end of the first step, and tokens/s over the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported at run time inside main(), after the start time is taken
    import torch

    from elmtrain.data.shards import TokenSequences

STARTED = time.monotonic()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--forest", required=True)
    cli.add_argument("--data", required=True)
    cli.add_argument("--steps", type=int, required=True)
    cli.add_argument("--in-memory", action="store_true")
    args = cli.parse_args()

    from elmcore.records import Progress
    from elmtrain.config import ModelConfig, TrainingConfig
    from elmtrain.forest import Forest
    from elmtrain.model.families import build_model
    from elmtrain.run.checkpoint import Checkpointer
    from elmtrain.run.progress import ProgressReporter
    from elmtrain.run.train import train
    from elmtrain.runtime import setup_runtime

    forest = Forest.open(args.forest)
    store = forest.token_store()
    cfg = TrainingConfig(steps=args.steps, batch_size=16, seq_len=128, checkpoint_interval=10**6)
    sequences: torch.Tensor | TokenSequences = store.sequences([args.data], cfg.seq_len)
    if args.in_memory:
        sequences = sequences[:]  # the whole (small) corpus as one tensor, as before shards
    tokenizer = store.tokenizer
    config = ModelConfig(family="gpt2", d_model=128, n_layers=4, n_heads=4, context_length=128)
    model = build_model(config, len(tokenizer), int(tokenizer.eos_token_id), seed=0)
    steps_done: list[float] = []

    class Timed(ProgressReporter):
        def due(self, force: bool = False) -> bool:
            return True  # every step: the loop reports (and reads its loss) only when due

        def report(self, progress: Progress, force: bool = False) -> None:
            if progress.phase == "training":
                steps_done.append(time.monotonic())

    run = "bench-train-memory" if args.in_memory else "bench-train-shards"
    outcome = train(
        model,
        sequences,
        cfg,
        setup_runtime(cfg),
        Checkpointer(forest.storage, run),
        Timed(None, run),
    )
    rest = steps_done[-1] - steps_done[0]
    tokens = (len(steps_done) - 1) * cfg.batch_size * cfg.seq_len
    report = {
        "sequences": len(sequences),
        "first_step_seconds": round(steps_done[0] - STARTED, 2),
        "tokens_per_second": round(tokens / rest, 1),
        "loss": outcome.final_loss,
    }
    (Path(args.forest) / "bench-train.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()

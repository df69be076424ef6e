"""What the benchmark trains per training seed, with the real ``elmtrain`` commands, resumable
over a work folder like BTM quality's (bench/btm/recipes.py):

    seed      f*T steps on the mixture of the mixed domains
    forest    one expert per domain, branched from the seed, (1-f)*T / experts steps each
    dense     the seed trained on for all the experts' steps plus the finetuning's
    mix-R     ``elmtrain mix`` of the forest (top-2, uniform average), router init R
    mix-R-ft  ``elmtrain mix-train`` of mix-R: every parameter, the finetuning's steps, on the
              experts' own training text (their lineage), with the load-balancing loss
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from bench.btm.recipes import Recipes, copy_forest, elmtrain
from bench.btx.scale import BtxScale

log = structlog.get_logger(__name__)
ROUTERS = ("centroids", "random")
COMMIT_MARKER = "COMMITTED.json"  # elmcore.layout's: a finished mix


@dataclass(frozen=True)
class SeedRun:
    training_seed: int
    forest: Path
    dense: Path
    mixes: dict[str, Path]  # router init -> the mix as written
    finetuned: dict[str, Path]  # router init -> the mix after mix-train


def mix(forest: Path, out: Path, router: str, top_k: int, seed: int, seq_len: int) -> None:
    if (out / COMMIT_MARKER).is_file():
        return
    elmtrain(
        "mix",
        "--forest",
        str(forest),
        "--out",
        str(out),
        "--router",
        router,
        "--top-k",
        str(top_k),
        "--seed",
        str(seed),
        "--seq-len",
        str(seq_len),
    )


def train_seed(recipes: Recipes, scale: BtxScale, template: Path, work: Path, seed: int) -> SeedRun:
    btm = scale.btm
    root = work / f"seed-{seed}"
    seeded, forest, dense = root / "seed", root / "forest", root / "dense"
    log.info("btx.train", seed=seed, expert_steps=scale.expert_steps, dense=scale.dense_steps)
    recipes.seed(template, seeded, btm.first, btm.seed_steps(btm.main_fraction), seed)
    copy_forest(seeded, forest)
    recipes.experts(forest, btm.first, scale.expert_steps, seed)
    recipes.dense(seeded, dense, btm.first, scale.dense_steps, seed)
    top_k = min(btm.top_k, len(btm.first))
    mixes, finetuned = {}, {}
    for router in ROUTERS:
        mixes[router], finetuned[router] = root / f"mix-{router}", root / f"mix-{router}-ft"
        mix(forest, mixes[router], router, top_k, seed, btm.seq_len)
        # mix-train finds its own finished output (the same run id), so a rerun skips it.
        elmtrain(
            "mix-train",
            "--forest",
            str(forest),
            "--mix",
            str(mixes[router]),
            "--out",
            str(finetuned[router]),
            "--training",
            recipes.training(scale.finetune_steps, seed),
        )
    return SeedRun(seed, forest, dense, mixes, finetuned)

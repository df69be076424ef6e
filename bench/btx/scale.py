"""How big a BTX run is: BTM quality's Scale (domains, model, budget, evaluation sizes) plus
what only BTX has (the mix's finetuning steps, the cost measurement's sizes)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.btm.scale import FULL as BTM_FULL
from bench.btm.scale import Scale


@dataclass(frozen=True)
class BtxScale:
    btm: Scale  # ``first`` are the experts mixed; ``new``, sweeps and counts are unused
    finetune_steps: int  # each mix's finetuning; also added to the dense model's budget
    cost_sequences: int  # test sequences scored per timing
    new_tokens: int  # tokens generated per timing
    repeats: int  # timings per model (the median is kept)

    @property
    def expert_steps(self) -> int:
        return self.btm.expert_steps(self.btm.main_fraction, len(self.btm.first))

    @property
    def dense_steps(self) -> int:
        """The experts' steps and the finetuning's: dense gets what the mix cost after the seed."""
        return self.expert_steps * len(self.btm.first) + self.finetune_steps


# What a BTX run leaves out of BTM quality's Scale: the new domains, the sweeps, the counts.
_BTX_ONLY: dict[str, object] = {
    "new": (),
    "fractions": (0.5,),
    "main_fraction": 0.5,
    "domain_counts": (),
    "training_seeds": (0, 1, 2),
}


def _btm(**fields: object) -> Scale:
    merged = {**_BTX_ONLY, **fields}
    merged.setdefault("count_order", merged["first"])
    return Scale(**merged)  # type: ignore[arg-type]


# Issue 31's size: BTM quality's model, context, batch, vocabulary, budget and evaluation sizes
# (bench/btm/scale.py FULL) with the Llama family, since only Llama forests can be mixed; each
# mix finetuned for a tenth of a forest's steps (counted in dense's budget). 7-15 min a seed
# on 2 quiet CPU cores.
FULL = BtxScale(
    btm=replace(
        BTM_FULL,
        **_BTX_ONLY,  # type: ignore[arg-type]
        model={**BTM_FULL.model, "family": "llama"},
        count_order=BTM_FULL.first,
    ),
    finetune_steps=240,
    cost_sequences=16,
    new_tokens=32,
    repeats=3,
)
# What fitted the first window on 2 CPU cores shared with three other sessions (2026-12-04,
# `--small`): BTM quality's domains and evaluation layout, but a smaller Llama (64 wide, 2
# layers), a 64-token context, batches of 8 and 1,280 steps per forest. A step of the full size
# took 0.8 to 6 s on that machine then (8 to 60 times its quiet speed).
SMALL = BtxScale(
    btm=_btm(
        first=("changelogs", "code", "legal", "scripture"),
        held_out=("perldocs", "quotes"),
        ood="devil",
        model={
            "family": "llama",
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
            "context_length": 64,
        },
        vocab_size=1024,
        batch_size=8,
        seq_len=64,
        total_steps=1280,
        max_bytes=None,
        eval_sequences=64,
        prior_sequences=16,
    ),
    finetune_steps=128,
    cost_sequences=16,
    new_tokens=32,
    repeats=3,
)
QUICK = BtxScale(
    btm=_btm(
        first=("code", "legal", "scripture"),
        held_out=("quotes", "perldocs"),
        ood="devil",
        model={"family": "llama", "d_model": 32, "n_layers": 1, "n_heads": 2, "context_length": 64},
        vocab_size=512,
        batch_size=8,
        seq_len=64,
        total_steps=60,
        training_seeds=(0, 1),
        max_bytes=200_000,
        eval_sequences=16,
        prior_sequences=8,
    ),
    finetune_steps=10,
    cost_sequences=8,
    new_tokens=8,
    repeats=2,
)

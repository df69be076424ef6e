"""How big a BTX run is: BTM quality's Scale (domains, model, budget, evaluation sizes) plus
what only BTX has (the mix's finetuning steps, the cost measurement's sizes)."""

from __future__ import annotations

from dataclasses import dataclass

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


def _btm(**fields: object) -> Scale:
    common: dict[str, object] = {
        "new": (),
        "fractions": (0.5,),
        "main_fraction": 0.5,
        "domain_counts": (),
        "training_seeds": (0, 1, 2),
    }
    merged = {**common, **fields}
    merged.setdefault("count_order", merged["first"])
    return Scale(**merged)  # type: ignore[arg-type]


# What fits issue 31's window (about 40 min on 2 CPU cores shared with three other sessions,
# 2026-12-04): btm_quality's four first-stage domains, held-out sets and evaluation layout, but a
# smaller Llama (64 wide, 2 layers), a 64-token context, batches of 8 and 1,280 steps per forest
# instead of 2,400 (docs/btx.md says so beside the numbers). A step of the btm_quality size took
# 0.8 to 6 s on that machine then (8 to 60 times its quiet speed): 3 seeds of it would not fit.
# A first run at 320 steps per forest (experts of 40 steps) left the experts barely trained.
FULL = BtxScale(
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

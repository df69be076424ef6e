"""One request never harms another, in the engine (elmtrain/serving/engine.py): whatever fails
while starting or decoding one completion fails it alone, and the completions batched with it
get exactly what they would have got alone. A cancelled completion leaves at the next step.

The engine runs for real on small random models (three experts and a seed); faults are
injected where a request could cause them: its target, its seed, the hand-over of its text,
and a model's forward pass over a batch that holds it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from elmtrain.config import ModelConfig
from elmtrain.model.families import build_model
from elmtrain.runtime import Runtime
from elmtrain.serving import kvbatch
from elmtrain.serving.completion import Completion, Done, Failed, Routed, Text, Update
from elmtrain.serving.engine import Engine
from elmtrain.serving.modelset import ENSEMBLE, EXPERT, SEED, Member, ModelSet, Target

CPU = torch.device("cpu")
VOCAB = 97
WAIT = 60.0  # seconds any one completion may take here (they take milliseconds)


class Letters:
    """A tokenizer for the engine: token t is a letter; 0 is the end of text."""

    eos_token_id = 0

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in tokens)


def _model(seed: int) -> torch.nn.Module:
    config = ModelConfig(family="gpt2", d_model=32, n_layers=2, n_heads=4, context_length=64)
    model: torch.nn.Module = build_model(config, VOCAB, 0, seed=seed).eval()
    return model


@pytest.fixture(scope="module")
def model_set() -> ModelSet:
    experts = [Member(f"expert/{d}", d, 1, _model(i)) for i, d in enumerate(("a", "b", "c"))]
    return ModelSet(
        name="forest",
        revision=1,
        tokenizer=Letters(),
        experts=experts,
        seed=Member("seed", None, None, _model(9)),
        log_prior=torch.full((3,), math.log(1 / 3), dtype=torch.float64),
        expert_dirs=[],
        runtime=Runtime(device=CPU),
    )


@pytest.fixture
def engine() -> Iterator[Engine]:
    running = Engine(top_k=2, max_active=16)
    running.start()
    yield running
    running.stop()


@dataclass
class Outcome:
    """What one completion was told, collected from the engine thread."""

    updates: list[Update] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    refuse: bool = False  # its hand-over fails (a client gone mid-answer)

    def emit(self, update: Update) -> None:
        if self.refuse and isinstance(update, Text):
            raise RuntimeError("the client's queue is gone")
        self.updates.append(update)
        if isinstance(update, Done | Failed):
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.updates if isinstance(u, Text))

    @property
    def failed(self) -> bool:
        return any(isinstance(u, Failed) for u in self.updates)


def completion(
    model_set: ModelSet, target: Target, prompt: list[int], outcome: Outcome, **settings: Any
) -> Completion:
    return Completion(
        model_set=model_set,
        target=target,
        prompt_ids=[0, *prompt],
        max_tokens=settings.get("max_tokens", 12),
        temperature=settings.get("temperature", 0.0),
        top_p=1.0,
        stop=[],
        seed=settings.get("seed", 5),
        emit=outcome.emit,
    )


def run(engine: Engine, completions: list[Completion], outcomes: list[Outcome]) -> None:
    """Submit together (so they are admitted and batched together) and wait for every end."""
    for each in completions:
        engine.submit(each)
    for outcome in outcomes:
        assert outcome.ended.wait(WAIT), outcome.updates


GOOD = [
    (Target(ENSEMBLE), [5, 6, 7, 8]),
    (Target(EXPERT, 1), [9, 10]),
    (Target(SEED), [11, 12, 13]),
    (Target(ENSEMBLE), [14]),
]


def alone(engine: Engine, model_set: ModelSet, **settings: Any) -> list[str]:
    texts = []
    for target, prompt in GOOD:
        outcome = Outcome()
        run(engine, [completion(model_set, target, prompt, outcome, **settings)], [outcome])
        assert not outcome.failed
        texts.append(outcome.text)
    return texts


def together_with(
    engine: Engine, model_set: ModelSet, poisoned: list[tuple[Completion, Outcome]]
) -> list[str]:
    """The good completions batched with the poisoned ones, which must fail; the good ones'
    texts (none may fail)."""
    outcomes = [Outcome() for _ in GOOD]
    good = [
        completion(model_set, target, prompt, outcome)
        for (target, prompt), outcome in zip(GOOD, outcomes, strict=True)
    ]
    mixed = good[:2] + [c for c, _ in poisoned] + good[2:]
    bad = [o for _, o in poisoned]
    run(engine, mixed, outcomes + bad)
    assert all(o.failed for o in bad), [o.updates for o in bad]
    assert not any(o.failed for o in outcomes), [o.updates for o in outcomes]
    assert all(isinstance(o.updates[-1], Done) for o in outcomes)
    return [o.text for o in outcomes]


def test_a_completion_that_cannot_start_fails_alone(engine: Engine, model_set: ModelSet) -> None:
    expected = alone(engine, model_set)
    bad = [Outcome(), Outcome()]
    poisoned = [
        (completion(model_set, Target(EXPERT, 99), [3, 4], bad[0]), bad[0]),  # no such expert
        (completion(model_set, Target(ENSEMBLE), [3, VOCAB + 5], bad[1]), bad[1]),  # no such id
    ]
    assert together_with(engine, model_set, poisoned) == expected
    assert engine.alive


def test_any_integer_seed_is_served(engine: Engine, model_set: ModelSet) -> None:
    """Seeds beyond torch's range (the HTTP side bounds them too) are mapped into it."""
    for seed in (10**23, -(10**23), 2**64, -1):
        outcome = Outcome()
        each = completion(model_set, Target(ENSEMBLE), [5, 6], outcome, seed=seed, temperature=1)
        run(engine, [each], [outcome])
        assert not outcome.failed and isinstance(outcome.updates[-1], Done), (seed, outcome)


def test_a_failing_decode_step_fails_only_the_completion_it_fails_for(
    engine: Engine, model_set: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = alone(engine, model_set)
    poison = Outcome()
    poisoned = completion(model_set, Target(ENSEMBLE), [20, 21], poison)
    step = kvbatch.DecodeBatch.step

    def failing_step(batch: kvbatch.DecodeBatch[Any], tokens: Any) -> torch.Tensor:
        # A forward pass over a batch that holds the poisoned completion fails (as a model
        # error caused by one sequence would), at its third step.
        if any(s.completion is poisoned and s.generated >= 2 for s in batch.members):
            raise RuntimeError("a forward pass failed")
        return step(batch, tokens)

    monkeypatch.setattr(kvbatch.DecodeBatch, "step", failing_step)
    assert together_with(engine, model_set, [(poisoned, poison)]) == expected
    assert len(poison.text) == 2  # it ran, then failed alone, mid-answer
    assert engine.alive


def test_a_failing_hand_over_fails_that_completion_alone(
    engine: Engine, model_set: ModelSet
) -> None:
    expected = alone(engine, model_set)
    refused = Outcome(refuse=True)
    poisoned = completion(model_set, Target(ENSEMBLE), [30, 31], refused)
    assert together_with(engine, model_set, [(poisoned, refused)]) == expected


def test_a_cancelled_completion_leaves_at_the_next_step(
    engine: Engine, model_set: ModelSet
) -> None:
    outcome = Outcome()
    long = completion(model_set, Target(ENSEMBLE), [5], outcome, max_tokens=60, temperature=1)
    generated = []

    def cancel_at_first_token(what: str, value: Any) -> None:
        # On the engine thread, as its first token is taken: the client goes away then.
        if what == "token":
            generated.append(value)
            long.cancelled.set()

    engine._hook = cancel_at_first_token
    engine.submit(long)
    for _ in range(int(WAIT / 0.05)):
        if generated and not engine.active:
            break
        threading.Event().wait(0.05)
    assert generated == [1] and engine.active == 0  # gone at the next step, not 60 tokens on
    assert not any(isinstance(u, Done) for u in outcome.updates)
    assert any(isinstance(u, Routed) for u in outcome.updates)

"""What the HTTP side hands the engine (a ``Completion``: one prompt to complete, and how) and
what the engine tells it back (``Update``s: routed, text, done, failed), across threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from elmtrain.serving.modelset import ModelSet, Target


@dataclass(frozen=True)
class Routed:
    """The completion started: which experts serve it, with what weights."""

    routing: list[dict[str, Any]]  # {"expert", "version", "weight"} each: the answer's extra
    prompt_tokens: int


@dataclass(frozen=True)
class Text:
    """Text that became final (streaming: as it comes; otherwise all of it, once)."""

    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    tokens: tuple[int, ...] = ()  # the completion's token ids (what its logprobs score)


@dataclass(frozen=True)
class Failed:
    """This completion alone could not be served (the others in its batch go on)."""

    message: str


Update = Routed | Text | Done | Failed


@dataclass(eq=False)  # identity: two equal requests are still two completions
class Completion:
    """One choice of one request."""

    model_set: ModelSet
    target: Target
    prompt_ids: list[int]  # begins with the end-of-text token (the context of the first token)
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None  # any integer: the engine maps it onto torch's range
    emit: Callable[[Update], None]  # called from the engine thread; must be thread-safe
    stream: bool = True  # text as it comes; False: all of it with Done (fewer wake-ups)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Indices into model_set.experts it may be served by (serving/optout.py); None: all.
    experts: tuple[int, ...] | None = None
    # Routed by cluster: the prompt's weight of each expert (of ``model_set.experts``; 0 for
    # those not allowed), which choose and mix the experts instead of the posterior. None: the
    # posterior routes.
    cluster_weights: tuple[float, ...] | None = None

    @property
    def allowed(self) -> tuple[int, ...]:
        """The experts it may be served by (indices into ``model_set.experts``)."""
        if self.experts is None:
            return tuple(range(len(self.model_set.experts)))
        return self.experts

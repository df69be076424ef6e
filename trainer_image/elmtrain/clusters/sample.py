"""A uniform sample of a stream of documents of unknown length, in bounded memory."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Reservoir:
    """Algorithm R (Vitter 1985): after ``seen`` documents, ``kept`` is a uniform sample of
    ``min(seen, size)`` of them, and no more than ``size`` are ever held, so fitting a
    clusterer costs the same memory for a corpus of a thousand documents or a billion."""

    size: int
    seed: int = 0
    kept: list[str] = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"reservoir size must be >= 1, got {self.size}")
        self._rng = random.Random(self.seed)

    def add(self, document: str) -> None:
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append(document)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:
            self.kept[slot] = document

    def extend(self, documents: Iterable[str]) -> Reservoir:
        for document in documents:
            self.add(document)
        return self

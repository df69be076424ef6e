"""Tiny synthetic multi-domain corpora: each domain its own words and sentence shapes.

Deterministic for a seed, so tests never need the shared corpus or a download.
"""

from __future__ import annotations

import random
from pathlib import Path

DOMAIN_WORDS = {
    "cooking": [
        "salt",
        "pepper",
        "onion",
        "garlic",
        "simmer",
        "boil",
        "butter",
        "flour",
        "oven",
        "whisk",
        "stir",
        "bake",
    ],
    "sailing": [
        "keel",
        "mast",
        "sail",
        "wind",
        "tack",
        "jib",
        "hull",
        "port",
        "starboard",
        "anchor",
        "harbor",
        "knot",
    ],
    "finance": [
        "bond",
        "yield",
        "equity",
        "stock",
        "dividend",
        "ledger",
        "asset",
        "credit",
        "debit",
        "margin",
        "loan",
    ],
    "poetry": [
        "moon",
        "rose",
        "sorrow",
        "night",
        "dream",
        "silver",
        "heart",
        "tender",
        "river",
        "ember",
        "dusk",
    ],
    "weather": [
        "rain",
        "front",
        "gust",
        "drizzle",
        "pressure",
        "humid",
        "cloud",
        "thunder",
        "frost",
        "breeze",
        "forecast",
    ],
}
SHAPES = {
    "cooking": "{a} the {b} with {c} then {d}.",
    "sailing": "At {a} we raised the {b}; the {c} held {d}.",
    "finance": "{a}: {b} rose 3.2% while {c} fell on {d} concerns",
    "poetry": "O {a}, thy {b} -- a {c} of {d}!",
    "weather": "Forecast for {a}: {b} and {c}, later {d}",
}


def domain_text(domain: str, documents: int, seed: int = 0) -> str:
    rng = random.Random(f"{domain}-{seed}")
    words, shape = DOMAIN_WORDS[domain], SHAPES[domain]
    docs = []
    for _ in range(documents):
        lines = [
            shape.format(**{k: rng.choice(words) for k in "abcd"}) for _ in range(rng.randint(3, 8))
        ]
        docs.append("\n".join(lines))
    return "\n\n\n".join(docs) + "\n"


def write_domains(
    root: Path, domains: list[str], train_docs: int = 120, valid_docs: int = 12
) -> Path:
    for domain in domains:
        folder = root / domain
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.txt").write_text(domain_text(domain, train_docs, seed=0))
        (folder / "valid.txt").write_text(domain_text(domain, valid_docs, seed=1))
    return root

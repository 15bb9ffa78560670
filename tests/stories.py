"""The tests' story corpus: simple, learnable text (no pytest here, so that benchmarks can
use it too)."""

from __future__ import annotations

import random

NAMES = ["tom", "lily", "ben", "mia", "sam", "anna"]
THINGS = ["red ball", "big dog", "little cat", "blue kite", "green frog", "toy car"]
PLACES = ["park", "garden", "house", "forest", "beach", "school"]


def story_corpus(lines: int, seed: int = 0) -> str:
    """Simple, learnable text: a handful of sentence shapes over a small vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
        out.append(f"once upon a time {name} found a {thing} in the {place}. {name} was happy.")
    return "\n".join(out) + "\n"

"""Deterministic prompts for the tests: random byte tokens from a seed."""

from __future__ import annotations

import random


def prompt_ids(seed: int, length: int) -> list[int]:
    """``length`` token ids below 256 (bytes, which every tiny tokenizer has)."""
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]

"""Sequences for BlockManager tests, and a full prefill's bookkeeping without a model."""

from __future__ import annotations

from ember_functions.block_manager import BlockManager
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import Sequence


def seq(rid: str, tokens: list[int], *, salt: str = "") -> Sequence:
    return Sequence(
        request_id=rid,
        prompt_ids=list(tokens),
        params=SamplingParams(),
        max_tokens=16,
        arrival_s=0.0,
        cache_salt=salt,
    )


def admit_and_compute(bm: BlockManager, s: Sequence) -> None:
    """Admits ``s`` (with whatever prefix hits it has) and marks every token computed,
    as a full prefill would."""
    hits = bm.match_prefix(s)
    bm.admit(s, cached_blocks=hits, num_new_tokens=s.num_tokens - len(hits) * bm.block_size)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)

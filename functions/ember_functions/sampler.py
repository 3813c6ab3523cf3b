"""Turns a step's logits into next tokens, each row with its own sampling params.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then
draw with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which needs one
random vector per row: a seeded request draws it from its own generator, so its
tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from ember_functions.sampling_params import SamplingParams


class Sampler:
    def __init__(self, *, seed: int = 0) -> None:
        self._unseeded = torch.Generator().manual_seed(seed)
        self._seeded: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._seeded.pop(request_id, None)

    def sample(
        self,
        logits: torch.Tensor,  # [N, vocab] float32
        params: list[SamplingParams],
        request_ids: list[str],
    ) -> list[int]:
        tokens = torch.empty(logits.shape[0], dtype=torch.int64)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            rows = torch.tensor(greedy)
            tokens[rows] = logits[rows].argmax(dim=-1).cpu()
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = self._sample_row(logits[i], p, request_ids[i])
        return tokens.tolist()

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, request_id: str) -> int:
        scaled = logits.float().cpu() / p.temperature  # [vocab]
        if p.top_k and p.top_k < scaled.shape[0]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the top token).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        noise = torch.empty_like(probs).exponential_(generator=self._generator(p, request_id))
        return int((probs / noise).argmax())

    def _generator(self, p: SamplingParams, request_id: str) -> torch.Generator:
        if p.seed is None:
            return self._unseeded
        gen = self._seeded.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(p.seed)
            self._seeded[request_id] = gen
        return gen

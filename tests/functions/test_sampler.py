"""Sampler: greedy, top-k, top-p, temperature, and per-request seeds."""

from __future__ import annotations

import torch

from ember_functions.sampler import Sampler
from ember_functions.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0)


def random_logits(rows: int, vocab: int = 320, *, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def ids(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def draw_counts(
    sampler: Sampler, logits_row: torch.Tensor, params: SamplingParams, n: int
) -> torch.Tensor:
    """Token counts over ``n`` independent draws from one row (one batched call)."""
    tokens = sampler.sample(logits_row.expand(n, -1), [params] * n, ids(n))
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[0]).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_greedy_is_argmax() -> None:
    logits = random_logits(32)
    tokens = Sampler(seed=0).sample(logits, [GREEDY] * 32, ids(32))
    assert tokens == logits.argmax(-1).tolist()


def test_greedy_rows_ignore_the_sampled_rows_beside_them() -> None:
    logits = random_logits(16, seed=1)
    hot = SamplingParams(temperature=1.5)
    params = [GREEDY if i % 2 else hot for i in range(16)]
    tokens = Sampler(seed=0).sample(logits, params, ids(16))
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in range(1, 16, 2)] == [argmax[i] for i in range(1, 16, 2)]
    # ...and the sampled rows really sampled (flat-ish rows at temperature 1.5).
    assert [tokens[i] for i in range(0, 16, 2)] != [argmax[i] for i in range(0, 16, 2)]


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(64, seed=2)
    sampler = Sampler(seed=0)
    for temperature in (0.5, 1.0, 5.0):
        params = SamplingParams(temperature=temperature, top_k=1)
        assert sampler.sample(logits, [params] * 64, ids(64)) == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy() -> None:
    logits = random_logits(64, seed=3)
    sampler = Sampler(seed=0)
    params = SamplingParams(temperature=3.0, top_p=1e-6)
    assert sampler.sample(logits, [params] * 64, ids(64)) == logits.argmax(-1).tolist()


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    sampler = Sampler(seed=0)
    n = 6000
    for temperature in (0.7, 1.0, 2.0):
        probs = torch.softmax(logits / temperature, -1)
        counts = draw_counts(sampler, logits, SamplingParams(temperature=temperature), n)
        # 4 degrees of freedom: P(chi2 > 25) is about 5e-5, and the draws are seeded.
        assert chi_square(counts, probs) < 25, (temperature, counts / n, probs)
    # Lower temperature sharpens: the top token's share grows.
    cold = draw_counts(sampler, logits, SamplingParams(temperature=0.3), n)[0] / n
    hot = draw_counts(sampler, logits, SamplingParams(temperature=3.0), n)[0] / n
    assert cold > 0.9 > 0.4 > hot


def test_top_k_samples_only_among_the_k_best() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 1.0, 0.0])
    counts = draw_counts(Sampler(seed=1), logits, SamplingParams(temperature=1.0, top_k=3), 6000)
    assert counts[[0, 2, 5]].sum() == 0
    kept = torch.tensor([1, 3, 4])
    probs = torch.zeros(6)
    probs[kept] = torch.softmax(logits[kept], -1)
    assert chi_square(counts, probs) < 20  # 2 degrees of freedom


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()
    counts = draw_counts(Sampler(seed=2), logits, SamplingParams(temperature=1.0, top_p=0.7), 6000)
    # 0.5 < 0.7 so the second token is needed; 0.5 + 0.3 reaches 0.7, so the rest go.
    assert counts[2] == counts[3] == 0
    assert chi_square(counts, torch.tensor([0.625, 0.375, 0.0, 0.0])) < 15


def test_seeded_requests_are_reproducible_whatever_the_batch() -> None:
    logits = random_logits(1, seed=4)[0] / 3  # a flat row: draws vary a lot
    params = SamplingParams(temperature=1.0, seed=7)

    def alone(sampler: Sampler, rid: str) -> list[int]:
        return [sampler.sample(logits[None], [params], [rid])[0] for _ in range(20)]

    reference = alone(Sampler(seed=0), "x")
    assert alone(Sampler(seed=123), "x") == reference  # the engine seed does not matter
    assert alone(Sampler(seed=0), "another-id") == reference  # nor the request id
    # Inside a batch with greedy, unseeded and other seeded rows, row 2 draws the same.
    batch_params = [
        GREEDY,
        SamplingParams(temperature=1.0),
        params,
        SamplingParams(temperature=1.0, seed=8),
    ]
    sampler = Sampler(seed=0)
    in_batch = [
        sampler.sample(logits.expand(4, -1), batch_params, ["g", "u", "x", "y"])[2]
        for _ in range(20)
    ]
    assert in_batch == reference
    # Another seed draws another sequence.
    other = SamplingParams(temperature=1.0, seed=8)
    sampler = Sampler(seed=0)
    assert [sampler.sample(logits[None], [other], ["x"])[0] for _ in range(20)] != reference


def test_forget_restarts_a_seeded_request() -> None:
    logits = random_logits(1, seed=5)[0] / 3
    params = SamplingParams(temperature=1.0, seed=11)
    sampler = Sampler(seed=0)
    first = [sampler.sample(logits[None], [params], ["x"])[0] for _ in range(10)]
    more = [sampler.sample(logits[None], [params], ["x"])[0] for _ in range(10)]
    assert more != first  # the generator advances within a request
    sampler.forget("x")
    assert [sampler.sample(logits[None], [params], ["x"])[0] for _ in range(10)] == first


def test_unseeded_draws_follow_the_sampler_seed() -> None:
    logits = random_logits(1, seed=6)[0] / 3
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(seed=seed)
        return [sampler.sample(logits[None], [params], ["r"])[0] for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)

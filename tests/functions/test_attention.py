"""Paged attention against attention written out in float64, one sequence at a time:
batched decodes of unequal lengths (the padding mask), a fresh prefill, and a prefill
chunk after a cached prefix, with grouped KV heads, in float32 and bf16."""

from __future__ import annotations

import math

import pytest
import torch

from ember_functions.attention import AttentionBatch, KVCache, PrefillChunk, paged_attention

H, HKV, D = 6, 2, 16  # 3 query heads per KV head
SCALE = 1 / math.sqrt(D)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int]) -> torch.Tensor:
    """Causal attention of queries at absolute positions ``q_pos`` over the whole
    context: q [n, H, D], k/v [ctx, Hkv, D] -> [n, H, D], in float64."""
    k = k.double().repeat_interleave(H // HKV, dim=1)  # [ctx, H, D]
    v = v.double().repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * SCALE  # [H, n, ctx]
    allowed = torch.arange(k.shape[0])[None, :] <= torch.tensor(q_pos)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decodes_of_unequal_lengths_then_prefills_match_the_reference(
    dtype: torch.dtype, atol: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    num_slots = 64
    cache = KVCache(
        num_layers=1,
        num_blocks=num_slots // 4,
        block_size=4,
        num_kv_heads=HKV,
        head_dim=D,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    k_cache, v_cache = cache.layer(0)  # [Hkv, slots, D]

    def at(cache: torch.Tensor, slots: list[int]) -> torch.Tensor:
        return cache[:, slots].transpose(0, 1)  # [len(slots), Hkv, D]

    def put(cache: torch.Tensor, slots: list[int], values: torch.Tensor) -> None:
        cache[:, slots] = values.transpose(0, 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    # Three decoding sequences with 5, 9 and 2 tokens of context (the new token last),
    # on scattered slots; then a fresh 4-token prefill; then a 3-token chunk after 6
    # cached tokens.
    decode_ctx = [5, 9, 2]
    perm = torch.randperm(num_slots, generator=gen)
    decode_slots = [perm[i * 10 : i * 10 + n].tolist() for i, n in enumerate(decode_ctx)]
    fresh_slots = perm[30:34].tolist()
    chunk_slots = perm[40:49].tolist()  # 6 cached + 3 new
    cached = chunk_slots[:6]
    put(k_cache, cached, rand(6, HKV, D))
    put(v_cache, cached, rand(6, HKV, D))
    for slots, n in zip(decode_slots, decode_ctx, strict=True):
        put(k_cache, slots[:-1], rand(n - 1, HKV, D))
        put(v_cache, slots[:-1], rand(n - 1, HKV, D))

    new_slots = [s[-1] for s in decode_slots] + fresh_slots + chunk_slots[6:]
    T = len(new_slots)  # 3 decodes + 4 + 3
    q, k, v = rand(T, H, D), rand(T, HKV, D), rand(T, HKV, D)
    max_len = max(decode_ctx)
    padded = torch.tensor([s + [0] * (max_len - len(s)) for s in decode_slots])
    lengths = torch.tensor(decode_ctx)
    batch = AttentionBatch(
        slot_mapping=torch.tensor(new_slots),
        num_decodes=3,
        decode_slots=padded,
        decode_mask=(torch.arange(max_len)[None, :] < lengths[:, None]).view(3, 1, 1, max_len),
        prefills=[
            PrefillChunk(3, 4, None, None),
            PrefillChunk(
                7,
                3,
                torch.tensor(chunk_slots),
                torch.arange(9)[None, :] <= torch.arange(6, 9)[:, None],
            ),
        ],
    )
    out = paged_attention(q, k, v, k_cache, v_cache, batch, scale=SCALE)

    assert out.dtype == dtype and out.shape == (T, H, D)
    for i, (slots, n) in enumerate(zip(decode_slots, decode_ctx, strict=True)):
        want = reference(q[i : i + 1], at(k_cache, slots), at(v_cache, slots), [n - 1])
        torch.testing.assert_close(out[i : i + 1].double(), want, atol=atol, rtol=0)
    want = reference(q[3:7], k[3:7], v[3:7], [0, 1, 2, 3])
    torch.testing.assert_close(out[3:7].double(), want, atol=atol, rtol=0)
    want = reference(q[7:], at(k_cache, chunk_slots), at(v_cache, chunk_slots), [6, 7, 8])
    torch.testing.assert_close(out[7:].double(), want, atol=atol, rtol=0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_cpu_kv_cache_reads_as_zeros_and_takes_memory_only_where_written() -> None:
    before = _rss_bytes()
    cache = KVCache(
        num_layers=8,
        num_blocks=4096,
        block_size=16,
        num_kv_heads=4,
        head_dim=64,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
    )  # 512 MiB
    assert cache.size_bytes == 512 << 20
    grown = _rss_bytes() - before
    assert grown < 32 << 20, f"allocating the cache touched {grown >> 20} MiB of it"
    k, _ = cache.layer(3)
    assert not k[:, 1000:1100].any()
    k[:, 5:9] = 1.0
    assert cache.read_blocks([0]).sum() == 4 * 4 * 64


def test_kv_blocks_export_and_import_round_trip() -> None:
    cache = KVCache(
        num_layers=2,
        num_blocks=6,
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    cache.data.copy_(torch.randn_like(cache.data))
    saved = cache.read_blocks([4, 1])  # [layers, 2, 2 blocks, block_size, kv_heads, head_dim]
    assert saved.shape == (2, 2, 2, 4, 2, 8)
    cache.write_blocks([0, 3], saved)
    assert torch.equal(cache.read_blocks([0, 3]), saved)
    assert torch.equal(cache.read_blocks([0]), cache.read_blocks([4]))
    k_layer0, _ = cache.layer(0)  # [kv_heads, slots, head_dim]: block 3 holds block 1's
    assert torch.equal(k_layer0[:, 12:16], k_layer0[:, 4:8])
    assert torch.equal(saved[0, 0, 1].transpose(0, 1), k_layer0[:, 4:8])
    with pytest.raises(ValueError, match="expected"):
        cache.write_blocks([0], saved)

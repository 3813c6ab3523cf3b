"""Paged attention over a block-structured KV cache.

The runner lays a step's tokens out as one flat batch: first one token per decoding
sequence, then each prefill chunk. ``AttentionBatch`` carries the index tensors that
describe that layout; they are built once per step and shared by every layer.

This is the portable torch path (CPU and CUDA). Decodes are batched into a single
SDPA call over gathered context slots with a padding mask; prefill chunks run one
SDPA call each, causal with an offset when earlier context is cached.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's chunk of new tokens in this step."""

    start: int  # first row of the chunk in the step's flat token batch
    num_tokens: int
    # Slots of the whole context so far (cached tokens + this chunk), or None when the
    # chunk is the sequence's entire context and its fresh K/V can be used directly.
    context_slots: torch.Tensor | None  # [context_len] int64
    # Causal mask aligned to the end of the context; None means plain causal.
    mask: torch.Tensor | None  # [num_tokens, context_len] bool, True = attend


@dataclass(frozen=True)
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    num_decodes: int  # rows [0, num_decodes) are single-token decodes
    decode_slots: torch.Tensor | None  # [num_decodes, max_context] int64, padded with 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context] bool
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Seam for batched LoRA: the adapter slot of every token (0 = base model), or None
    # when no sequence in the step uses an adapter. Projections read it; attention not.
    adapter_indices: torch.Tensor | None = None  # [T] int64


class KVCache:
    """Per-layer K and V tensors, head-major: ``[num_kv_heads, num_blocks, block_size,
    head_dim]``. Head-major because a batched decode gathers each sequence's context as
    ``[Hkv, n, L, D]``, which two batched matmuls read without a transposing copy; the
    slot-major layout cost a permuted copy of every gathered context in every layer."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = _zeros(shape, dtype=dtype, device=device)
        # Each layer's flat views, made once: a step asks for every layer's.
        self._layers = [(k.flatten(1, 2), v.flatten(1, 2)) for k, v in self.data]
        # On CPU, blocks [0, prefaulted_to) had their pages faulted in by prefault().
        self.prefaulted_to = 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``[num_kv_heads, num_slots, head_dim]`` views of one layer's K and V."""
        return self._layers[index]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copies blocks out, ``[layers, 2, len(block_ids), block_size, kv_heads, head_dim]``
        (block-major, whatever the cache's own layout): the unit the KV tier saves and
        restores."""
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.data.device)
        return self.data.index_select(3, index).permute(0, 1, 3, 4, 2, 5).contiguous()

    def blocks_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape :meth:`read_blocks` gives ``num_blocks`` blocks."""
        layers, two, kv_heads, _, block_size, head_dim = self.data.shape
        return (layers, two, num_blocks, block_size, kv_heads, head_dim)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Restores blocks produced by :meth:`read_blocks` into ``block_ids``."""
        expected = self.blocks_shape(len(block_ids))
        if tuple(blocks.shape) != expected:
            raise ValueError(f"blocks have shape {tuple(blocks.shape)}, expected {expected}")
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.data.device)
        head_major = blocks.to(self.data.device, self.data.dtype).permute(0, 1, 4, 2, 3, 5)
        self.data.index_copy_(3, index, head_major)

    def copy_slots(self, src_block: int, dst_block: int, num_tokens: int) -> None:
        """Copies the K and V of the first ``num_tokens`` slots of ``src_block`` into
        ``dst_block``, in every layer (a ``SlotCopy`` from the block manager)."""
        self.data[:, :, :, dst_block, :num_tokens] = self.data[:, :, :, src_block, :num_tokens]

    def prefault(self, start_block: int, stop_block: int) -> None:
        """Faults in the pages of blocks ``start_block..stop_block-1``, which must be
        fresh (never handed out: zero, and nobody's). On CPU the cache is anonymous memory
        the kernel maps a page at a time on first write (see ``_zeros``): a request that
        writes fresh blocks takes a fault per page, ~180 of them per SmolLM2 block,
        because a block's slots are spread over every layer and head (2-5 ms of a short
        prompt's first token, measured). Writing the zeros they already hold moves that
        to when the engine is idle. Elsewhere the cache is allocated up front: nothing to
        do."""
        if self.data.device.type == "cpu" and start_block < stop_block:
            self.data[:, :, :, start_block:stop_block].zero_()
        self.prefaulted_to = max(self.prefaulted_to, stop_block)

    @property
    def size_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _zeros(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On CPU it lives in anonymous memory, which the kernel zero-fills a
    page at a time when first touched: ``torch.zeros`` would write the whole cache up
    front (a page fault and a memset per 4 KiB, ~0.3 s per GiB on a cold start), while
    a request only touches the blocks it fills. Zeros, not garbage, because padded
    decode slots are read (masked, but 0 x NaN is NaN)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(1, count * dtype.itemsize))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [Hkv, num_slots, D]
    v_cache: torch.Tensor,  # [Hkv, num_slots, D]
    batch: AttentionBatch,
    *,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    k_cache.index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
    out = torch.empty_like(q)
    n = batch.num_decodes
    if n:
        assert batch.decode_slots is not None  # built together with num_decodes
        flat = batch.decode_slots.view(-1)
        shape = (k.shape[1], n, batch.decode_slots.shape[1], k.shape[2])
        kk = k_cache.index_select(1, flat).view(shape)  # [Hkv, n, L, D]
        vv = v_cache.index_select(1, flat).view(shape)
        if q.device.type == "cpu":
            out[:n] = _decode_attention_cpu(q[:n], kk, vv, batch.decode_mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(
                q[:n].unsqueeze(2),  # [n, H, 1, D]
                kk.transpose(0, 1),  # [n, Hkv, L, D]
                vv.transpose(0, 1),
                attn_mask=batch.decode_mask,
                scale=scale,
                enable_gqa=True,
            )
            out[:n] = o.squeeze(2)
    for chunk in batch.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        if chunk.context_slots is None:
            kk, vv = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [Hkv, n, D]
        else:
            kk = k_cache.index_select(1, chunk.context_slots)  # [Hkv, ctx, D]
            vv = v_cache.index_select(1, chunk.context_slots)
        # 4-D inputs: with 3-D ones and enable_gqa, CPU SDPA falls back to its math kernel
        # (2.3x slower on a 512-token prompt than the flash kernel these reach).
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
            kk.unsqueeze(0),  # [1, Hkv, ctx, D]
            vv.unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o[0].transpose(0, 1)
    return out


def _decode_attention_cpu(
    q: torch.Tensor,  # [n, H, D]
    k: torch.Tensor,  # [Hkv, n, L, D]
    v: torch.Tensor,  # [Hkv, n, L, D]
    mask: torch.Tensor | None,  # [n, 1, 1, L] bool, True = attend
    *,
    scale: float,
) -> torch.Tensor:  # [n, H, D]
    """One query token per sequence, as two batched matmuls over (KV head, sequence).
    CPU SDPA runs this shape (q_len 1) through its flash kernel one query block at a
    time, 16x slower at 32 sequences. The scores are float32, as a flash kernel keeps
    them (bf16 scores would round logits of ~10 by ~0.04), and so is the value product:
    in bf16 it is a oneDNN matmul, whose primitive is built and cached per context length,
    so each decode step built a new one (~0.8 ms) and kept it (~0.65 MB: +194 MiB of RSS
    over one 300-token SmolLM2 generation); in float32 it is a plain BLAS call, with no
    such cache, and the gathered values are small enough to convert (``bench/kernel_caches.py``)."""
    n, num_heads, head_dim = q.shape
    num_kv_heads, _, context, _ = k.shape
    group = num_heads // num_kv_heads
    batches = num_kv_heads * n
    qg = q.view(n, num_kv_heads, group, head_dim).transpose(0, 1)  # [Hkv, n, G, D]
    qg = qg.reshape(batches, group, head_dim).float()
    kf = k.reshape(batches, context, head_dim).float()
    scores = torch.bmm(qg, kf.transpose(1, 2)).mul_(scale)  # [Hkv * n, G, L]
    if mask is not None:
        scores.view(num_kv_heads, n, group, context).masked_fill_(
            ~mask.view(1, n, 1, context), float("-inf")
        )
    weights = torch.softmax(scores, dim=-1)
    o = torch.bmm(weights, v.reshape(batches, context, head_dim).float())  # [Hkv * n, G, D]
    o = o.to(q.dtype)
    return o.view(num_kv_heads, n, group, head_dim).transpose(0, 1).reshape(n, num_heads, head_dim)

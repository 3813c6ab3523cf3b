"""Executes one scheduled step on the model: builds the step's tensors, runs the
forward pass, returns logits for the rows that sample.

Token layout of a step: one row per decode first, then each prefill chunk's rows.
"""

from __future__ import annotations

import dataclasses

import torch

from ember_functions.attention import AttentionBatch, KVCache, PrefillChunk
from ember_functions.model import LlamaModel
from ember_functions.scheduler import Chunk, SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[Chunk]]:
        """Runs ``step``; returns logits ``[num_sampling_chunks, vocab]`` float32 and
        the chunks they belong to, in order."""
        for copy in step.copies:  # admitted sequences' shared slots, before they are read
            self.kv_cache.copy_slots(copy.src, copy.dst, copy.num_tokens)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[Chunk] = []
        row = 0
        for chunk in step.chunks:
            seq, start, n = chunk.seq, chunk.start_pos, chunk.num_tokens
            input_ids.extend(seq.tokens(start, start + n))
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq.block_table, start, start + n))
            row += n
            if chunk.samples:
                sample_rows.append(row - 1)
                sampling.append(chunk)
        batch = self._attention_batch(step, slots)
        if any(c.seq.adapter_slot for c in step.chunks):
            adapters = [c.seq.adapter_slot for c in step.chunks for _ in range(c.num_tokens)]
            batch = dataclasses.replace(
                batch, adapter_indices=torch.tensor(adapters, dtype=torch.int64, device=self.device)
            )
        dev = self.device
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_cache,
            batch,
        )  # [T, hidden]
        if not sample_rows:
            return torch.empty(0, self.model.config.vocab_size), []
        picked = hidden[torch.tensor(sample_rows, device=dev)]  # [N, hidden]
        return self.model.logits(picked), sampling

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _attention_batch(self, step: SchedulerOutput, slots: list[int]) -> AttentionBatch:
        dev = self.device
        decode_slots = decode_mask = None
        nd = len(step.decodes)
        if nd:
            lengths = [c.start_pos + 1 for c in step.decodes]
            max_len = max(lengths)
            bs = self.block_size
            max_blocks = -(-max_len // bs)
            tables = torch.tensor(
                [
                    c.seq.block_table[:max_blocks]
                    + [0] * (max_blocks - len(c.seq.block_table[:max_blocks]))
                    for c in step.decodes
                ],
                dtype=torch.int64,
            )  # [nd, max_blocks]
            offsets = torch.arange(bs, dtype=torch.int64)
            decode_slots = (
                (tables[:, :, None] * bs + offsets).view(nd, -1)[:, :max_len].contiguous()
            )
            decode_slots = decode_slots.to(dev)
            if min(lengths) < max_len:  # padding to mask; equal lengths need no mask
                lens = torch.tensor(lengths, dtype=torch.int64)
                mask = torch.arange(max_len)[None, :] < lens[:, None]
                decode_mask = mask.view(nd, 1, 1, max_len).to(dev)
        prefills = []
        row = nd
        for c in step.prefills:
            if c.start_pos == 0:
                prefills.append(PrefillChunk(row, c.num_tokens, None, None))
            else:
                ctx = c.start_pos + c.num_tokens
                ctx_slots = torch.tensor(self._slots(c.seq.block_table, 0, ctx), device=dev)
                q_pos = torch.arange(c.start_pos, ctx, device=dev)
                mask = torch.arange(ctx, device=dev)[None, :] <= q_pos[:, None]  # [n, ctx]
                prefills.append(PrefillChunk(row, c.num_tokens, ctx_slots, mask))
            row += c.num_tokens
        return AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decodes=nd,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=prefills,
        )

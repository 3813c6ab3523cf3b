"""Decides, each step, which sequences run and how many tokens each computes.

Iteration-level batching: sequences join and leave between steps. Each step spends a
token budget: first one token for every decoding sequence, then chunks of prompts
still being prefilled, then new admissions from the waiting queue (first come, first
served). When KV blocks run out, the most recently admitted running sequence is
preempted: its blocks are released and it goes back to the front of the queue, to
be recomputed later (its prefix-cached blocks usually survive).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ember_functions.block_manager import BlockManager, SlotCopy
from ember_functions.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Chunk:
    """``num_tokens`` new tokens of ``seq`` computed this step, starting at ``start_pos``."""

    seq: Sequence
    start_pos: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits pick the next one."""
        return self.start_pos + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[Chunk] = field(default_factory=list)
    prefills: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # KV slots to copy before the step runs: the public prefix's tail, for admissions.
    copies: list[SlotCopy] = field(default_factory=list)

    @property
    def chunks(self) -> list[Chunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Admission is refused while fewer blocks than this would stay free, so
        # running sequences can grow without immediately preempting each other.
        self.watermark_blocks = max(1, blocks.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queues and return its blocks (finish or cancel)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # Decodes first (one token each, latency-critical), then ongoing prefills.
        for decoding in (True, False):
            for seq in list(self.running):
                if budget == 0 or id(seq) in scheduled or seq not in self.running:
                    continue
                if (seq.num_uncomputed == 1) != decoding:
                    continue
                n = min(seq.num_uncomputed, budget)
                if not self._make_room(seq, n, scheduled, out):
                    continue
                self.blocks.grow(seq, n)
                chunk = Chunk(seq, seq.num_computed_tokens, n)
                (out.decodes if decoding else out.prefills).append(chunk)
                scheduled.add(id(seq))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq)
            cached = self.blocks.cached_tokens(seq, hits)
            n = min(seq.num_tokens - cached, budget)
            new_blocks = self.blocks.blocks_for(cached + n) - len(hits)
            reserve = self.watermark_blocks if self.running else 0
            if not self.blocks.can_allocate(new_blocks + reserve, reusing=hits):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached_blocks=hits, num_new_tokens=n)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = min(cached, len(seq.prompt_ids))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.prefills.append(Chunk(seq, cached, n))
            scheduled.add(id(seq))
            budget -= n
        out.copies = self.blocks.take_copies()
        return out

    def _make_room(
        self, seq: Sequence, num_tokens: int, scheduled: set[int], out: SchedulerOutput
    ) -> bool:
        """Preempt the newest unscheduled sequences until ``seq`` can grow."""
        while not self.blocks.can_grow(seq, num_tokens):
            victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

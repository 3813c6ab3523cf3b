"""Scheduler: token budget, decode-first ordering, admission, preemption, watermark.
Pure Python: a fake step marks scheduled tokens computed and appends sampled tokens."""

from __future__ import annotations

from itertools import count

from ember_functions.block_manager import BlockManager
from ember_functions.sampling_params import SamplingParams
from ember_functions.scheduler import Chunk, Scheduler, SchedulerOutput
from ember_functions.sequence import Sequence, SequenceStatus

_tokens = count(1000)


def seq(rid: str, num_prompt: int, *, tokens: list[int] | None = None) -> Sequence:
    """A sequence with ``num_prompt`` prompt tokens, unique unless ``tokens`` is given."""
    return Sequence(
        request_id=rid,
        prompt_ids=tokens if tokens is not None else [next(_tokens) for _ in range(num_prompt)],
        params=SamplingParams(),
        max_tokens=64,
        arrival_s=0.0,
    )


def scheduler(
    *, num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 32
) -> Scheduler:
    blocks = BlockManager(num_blocks=num_blocks, block_size=block_size)
    return Scheduler(blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def fake_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """What the engine does after the model ran: count tokens computed, commit full
    blocks, and append a sampled token for every chunk that reached its sequence's end."""
    for c in out.chunks:
        c.seq.num_computed_tokens += c.num_tokens
        sched.blocks.commit(c.seq)
    for c in out.chunks:
        if c.samples:
            c.seq.output_ids.append(next(_tokens))


def layout(chunks: list[Chunk]) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start_pos, c.num_tokens) for c in chunks]


def test_token_budget_and_chunked_prefill() -> None:
    sched = scheduler(budget=16)
    a, b, c = seq("a", 10), seq("b", 20), seq("c", 5)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert layout(out.prefills) == [("a", 0, 10), ("b", 0, 6)]
    assert out.num_tokens == 16
    assert [s.request_id for s in sched.waiting] == ["c"]
    assert out.prefills[0].samples and not out.prefills[1].samples
    fake_step(sched, out)
    out = sched.schedule()
    # a decodes, b's prefill continues, c gets the last token of the budget.
    assert layout(out.decodes) == [("a", 10, 1)]
    assert layout(out.prefills) == [("b", 6, 14), ("c", 0, 1)]
    assert out.num_tokens == 16
    steps = 0
    while sched.has_work and steps < 100:
        fake_step(sched, out)
        for s in list(sched.running):
            if len(s.output_ids) >= 3:
                sched.remove(s)
        out = sched.schedule()
        assert out.num_tokens <= 16
        steps += 1
    assert not sched.has_work
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_decodes_are_scheduled_before_prefills() -> None:
    sched = scheduler(budget=4)
    a, b = seq("a", 3), seq("b", 20)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert layout(out.chunks) == [("a", 0, 3), ("b", 0, 1)]
    fake_step(sched, out)
    out = sched.schedule()
    assert layout(out.decodes) == [("a", 3, 1)]
    assert layout(out.prefills) == [("b", 1, 3)]
    assert out.chunks[0].seq is a  # the runner lays decodes out first
    fake_step(sched, out)
    # With a budget of one token, the decode wins over the ongoing prefill.
    sched.max_num_batched_tokens = 1
    out = sched.schedule()
    assert layout(out.chunks) == [("a", 4, 1)]


def test_max_num_seqs_and_first_come_first_served() -> None:
    sched = scheduler(max_num_seqs=2, budget=100)
    seqs = [seq(f"s{i}", 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [c.seq.request_id for c in out.prefills] == ["s0", "s1"]
    assert [s.request_id for s in sched.waiting] == ["s2", "s3"]
    assert seqs[2].status is SequenceStatus.WAITING and seqs[2].block_table == []
    fake_step(sched, out)
    sched.remove(seqs[0])
    out = sched.schedule()
    assert [c.seq.request_id for c in out.prefills] == ["s2"]


def test_admission_does_not_skip_the_head_of_the_queue() -> None:
    sched = scheduler(num_blocks=10, budget=100)
    big, huge, small = seq("big", 28), seq("huge", 20), seq("small", 2)
    sched.add(big)  # 7 blocks
    out = sched.schedule()
    fake_step(sched, out)
    sched.add(huge)  # needs 5 blocks, only 3 free
    sched.add(small)  # would fit, but must not overtake
    out = sched.schedule()
    assert layout(out.prefills) == []
    assert [s.request_id for s in sched.waiting] == ["huge", "small"]


def test_preemption_picks_the_newest_sequence() -> None:
    sched = scheduler(num_blocks=4, block_size=4, budget=64)
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert [ch.seq for ch in out.prefills] == [a, b, c]
    fake_step(sched, out)
    assert sched.blocks.num_free_blocks == 1
    # Each now needs a second block for its 5th token; there is one free block.
    out = sched.schedule()
    assert out.preempted == [c]
    assert [ch.seq for ch in out.decodes] == [a, b]
    assert c.status is SequenceStatus.WAITING
    assert c.num_preemptions == 1 and a.num_preemptions == b.num_preemptions == 0
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert sched.waiting[0] is c
    assert c.output_ids  # its generated token is kept, to be recomputed
    fake_step(sched, out)
    # When room comes back, c returns first and recomputes prompt + output at once.
    d = seq("d", 2)
    sched.add(d)
    sched.remove(a)
    sched.remove(b)
    out = sched.schedule()
    assert [ch.seq for ch in out.prefills] == [c, d]
    first = out.prefills[0]
    assert first.start_pos + first.num_tokens == c.num_tokens == 5 and first.samples
    assert c.num_cached_prompt_tokens == 0  # recomputation is not billed as cached


def test_preemption_takes_the_newest_of_several_candidates() -> None:
    sched = scheduler(num_blocks=6, block_size=4, budget=64)
    a, b, c, d = seq("a", 4), seq("b", 4), seq("c", 4), seq("d", 8)
    for s in (a, b, c, d):
        sched.add(s)
    out = sched.schedule()
    assert [ch.seq for ch in out.prefills] == [a, b, c, d]
    fake_step(sched, out)
    assert sched.blocks.num_free_blocks == 1
    out = sched.schedule()
    # a takes the free block; b must evict c or d: d, the newest, whose two blocks
    # then also let c grow. Evicting c instead would leave d unable to grow.
    assert out.preempted == [d]
    assert [ch.seq for ch in out.decodes] == [a, b, c]
    assert sched.running == [a, b, c] and list(sched.waiting) == [d]
    for s in (a, b, c, d):
        sched.remove(s)
    assert sched.blocks.num_free_blocks == 6


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest() -> None:
    sched = scheduler(num_blocks=3, block_size=4, budget=64)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [ch.seq for ch in out.prefills] == [a, b]
    fake_step(sched, out)
    assert sched.blocks.num_free_blocks == 1
    out = sched.schedule()
    # a (oldest) takes the last free block; b would have to evict a, which is already
    # scheduled, so b gives up its own blocks and waits.
    assert out.preempted == [b]
    assert layout(out.decodes) == [("a", 4, 1)]
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert list(sched.waiting) == [b] and sched.running == [a]
    fake_step(sched, out)
    sched.remove(a)
    sched.remove(b)
    assert sched.blocks.num_free_blocks == 3


def test_watermark_keeps_blocks_free_for_running_sequences() -> None:
    sched = scheduler(num_blocks=200, block_size=4, budget=1000)
    assert sched.watermark_blocks == 2
    running = seq("r", 4 * 150 - 1)  # 150 blocks, room in the last for one more token
    sched.add(running)
    fake_step(sched, sched.schedule())
    assert sched.blocks.num_free_blocks == 50
    too_big = seq("w", 4 * 49)  # would leave 1 free block < watermark
    sched.add(too_big)
    assert sched.schedule().prefills == []
    sched.waiting.clear()
    fits = seq("f", 4 * 48)  # leaves exactly the watermark
    sched.add(fits)
    out = sched.schedule()
    assert [c.seq for c in out.prefills] == [fits]
    # With nothing running there is nobody to protect: the whole cache may be used.
    sched.remove(running)
    sched.remove(fits)
    alone = seq("alone", 4 * 200)
    sched.add(alone)
    assert [c.seq for c in sched.schedule().prefills] == [alone]
    sched.remove(alone)
    assert sched.blocks.num_free_blocks == 200


def test_prefix_hits_start_the_first_chunk_after_the_cached_tokens() -> None:
    sched = scheduler(block_size=4, budget=64)
    tokens = list(range(500, 514))  # 14 tokens: 3 full blocks
    a = seq("a", 0, tokens=tokens)
    sched.add(a)
    fake_step(sched, sched.schedule())
    b = seq("b", 0, tokens=list(tokens))
    sched.add(b)
    out = sched.schedule()
    assert layout(out.prefills) == [("b", 12, 2)]
    assert b.num_cached_prompt_tokens == 12
    assert b.block_table[:3] == a.block_table[:3]
    sched.remove(a)
    sched.remove(b)
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_remove_releases_blocks_from_either_queue() -> None:
    sched = scheduler(max_num_seqs=1)
    a, b = seq("a", 9), seq("b", 9)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert len(a.block_table) == 3
    sched.remove(b)  # waiting
    sched.remove(a)  # running
    assert not sched.has_work
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks

"""LLMEngine behaviour: continuous batching gives the tokens a request would get alone,
preemption and cancellation lose nothing and leak nothing, requests end for the right
reason, seeded sampling is reproducible, usage is exact."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from ember_core import InvalidRequestError
from ember_functions.engine import Completion, LLMEngine, Prompt, RequestOutput
from ember_functions.sampling_params import SamplingParams
from ember_functions.scheduler import SchedulerOutput
from ember_functions.sequence import Usage
from ember_functions.tiny import FAMILIES

from .random_prompts import prompt_ids

EngineFactory = Callable[..., LLMEngine]
EOS = 258  # <|im_end|>, the tiny models' end-of-sequence token

GREEDY_16 = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def drain(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    """Steps until the engine is idle; every output, per request id, in order."""
    outputs: dict[str, list[RequestOutput]] = defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def run(engine: LLMEngine, prompt: Prompt, params: SamplingParams, **kwargs: Any) -> Completion:
    """One request, alone on ``engine``, run to completion."""
    rid = engine.add_request(prompt, params, **kwargs)
    return Completion.from_outputs(drain(engine)[rid])


def one_by_one(
    engine: LLMEngine, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
) -> list[Completion]:
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    return [run(engine, p, sp) for p, sp in zip(prompts, plist, strict=True)]


def count_steps(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[SchedulerOutput]:
    plans: list[SchedulerOutput] = []
    original = engine.runner.execute

    def execute(plan: SchedulerOutput) -> Any:
        plans.append(plan)
        return original(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)
    return plans


# -- continuous batching --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_outputs_equal_single_request_outputs(
    family: str, make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [prompt_ids(100 + i, 3 + 4 * i) for i in range(16)]  # 3 .. 63 tokens
    engine = make_engine(family)
    plans = count_steps(engine, monkeypatch)
    batched = engine.generate(prompts, GREEDY_16)
    # Really batched: 528 prompt tokens need two 512-token steps, then 15 decode steps
    # of all 16 sequences at once.
    assert len(plans) <= 18
    assert max(len(p.decodes) for p in plans) == 16
    singles = one_by_one(make_engine(family), prompts, GREEDY_16)
    for i, (b, s) in enumerate(zip(batched, singles, strict=True)):
        assert b.token_ids == s.token_ids, f"prompt {i} ({len(prompts[i])} tokens)"
        assert b.text == s.text
        assert b.finish_reason == s.finish_reason == "length"
        assert b.usage == s.usage == Usage(len(prompts[i]), 16, 0)


def test_requests_joining_mid_flight_match_single_runs(make_engine: EngineFactory) -> None:
    prompts = [prompt_ids(200 + i, 5 + 9 * i) for i in range(12)]  # 5 .. 104 tokens
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    # A small token budget keeps long prompts in chunked prefill while others decode.
    engine = make_engine("qwen2", max_num_batched_tokens=48, block_size=8)
    joins = {0: 3, 2: 2, 3: 1, 7: 4, 12: 2}  # step index -> requests added before it
    pending = list(enumerate(prompts))
    ids: dict[str, int] = {}
    outputs: dict[str, list[int]] = defaultdict(list)
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(joins.get(step, 0)):
            i, p = pending.pop(0)
            ids[engine.add_request(p, params)] = i
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
        step += 1
    assert sorted(ids.values()) == list(range(12))
    singles = one_by_one(make_engine("qwen2"), prompts, params)
    for rid, i in ids.items():
        assert outputs[rid] == singles[i].token_ids, f"prompt {i}"


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_preemption_completes_every_request_identically(
    prefix_cache: bool, make_engine: EngineFactory
) -> None:
    prompts = [prompt_ids(300 + i, 14 + 3 * i) for i in range(8)]  # 14 .. 35 tokens
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=24, ignore_eos=True)
        for i in range(8)
    ]
    expected = make_engine("llama", block_size=4).generate(prompts, params)
    # 24 blocks of 4 tokens: room for about two of these (up to 59-token) sequences.
    engine = make_engine("llama", block_size=4, num_kv_blocks=24, prefix_cache=prefix_cache)
    requests = [engine.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for r in requests:
        engine.enqueue(r)
    outputs = drain(engine)
    assert any(r.seq.num_preemptions > 0 for r in requests), "the cache was never short"
    for i, r in enumerate(requests):
        got = Completion.from_outputs(outputs[r.seq.request_id])
        assert got.token_ids == expected[i].token_ids, f"request {i}"
        assert got.finish_reason == "length"
        assert got.usage.prompt_tokens == len(prompts[i])
        assert got.usage.completion_tokens == 24
        assert got.usage.cached_tokens == 0  # recomputation after preemption is not a cache hit


# -- cancellation ---------------------------------------------------------------------------


def test_cancel_mid_generation_frees_blocks_at_once(make_engine: EngineFactory) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [prompt_ids(400 + i, 10 + 5 * i) for i in range(3)]
    expected = one_by_one(make_engine("llama", block_size=4), prompts, params)
    engine = make_engine("llama", block_size=4)
    requests = [engine.make_request(p, params) for p in prompts]
    for r in requests:
        engine.enqueue(r)
    early: dict[str, list[int]] = defaultdict(list)
    for _ in range(5):
        for out in engine.step():
            early[out.request_id] += out.token_ids
    victim = requests[1].seq
    held = len(victim.block_table)
    assert held == -(-(15 + 5) // 4)  # prompt + 5 tokens, the last one not yet computed
    free = engine.blocks.num_free_blocks
    assert engine.cancel(victim.request_id) is True
    assert engine.blocks.num_free_blocks == free + held
    assert victim.block_table == []
    assert engine.cancel(victim.request_id) is False  # already ended
    outputs = drain(engine)
    [final] = outputs[victim.request_id]
    assert final.finished and final.finish_reason == "cancelled"
    assert final.token_ids == [] and final.text == ""
    assert final.usage == Usage(prompt_tokens=15, completion_tokens=5, cached_tokens=0)
    assert early[victim.request_id] == expected[1].token_ids[:5]
    for i in (0, 2):
        rid = requests[i].seq.request_id
        assert early[rid] + [t for o in outputs[rid] for t in o.token_ids] == expected[i].token_ids
        assert outputs[rid][-1].finish_reason == "length"


def test_cancel_a_waiting_request(make_engine: EngineFactory) -> None:
    engine = make_engine("llama", max_num_seqs=1)
    running = engine.add_request(prompt_ids(410, 12), GREEDY_16)
    waiting = engine.add_request(prompt_ids(411, 9), GREEDY_16)
    engine.step()
    assert engine.cancel(waiting)
    outputs = drain(engine)
    [final] = outputs[waiting]
    assert final.finish_reason == "cancelled"
    assert final.usage == Usage(prompt_tokens=9, completion_tokens=0, cached_tokens=0)
    assert outputs[running][-1].finish_reason == "length"


# -- how requests end ----------------------------------------------------------------------


def test_stop_string_ends_generation_without_the_stop(make_engine: EngineFactory) -> None:
    engine = make_engine("llama")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ids = prompt_ids(12, 37)
    ref = run(engine, ids, params)
    text = ref.text
    # Two printable ASCII characters a few characters in: two byte tokens, so the stop
    # string always spans tokens.
    pos = next(
        i
        for i in range(3, len(text) - 1)
        if text[i : i + 2].isascii() and text[i : i + 2].isprintable()
    )
    stop = text[pos : pos + 2]
    stopped = run(
        engine,
        ids,
        SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, stop=("<never>", stop)),
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]
    assert stop not in stopped.text
    n = len(stopped.token_ids)
    assert 0 < n < 48
    assert stopped.token_ids == ref.token_ids[:n]
    assert stopped.usage.completion_tokens == n


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_gives_length(max_tokens: int, make_engine: EngineFactory) -> None:
    engine = make_engine("smollm2")
    out = run(engine, "Once upon a time", SamplingParams(temperature=0, max_tokens=max_tokens))
    assert 258 not in out.token_ids  # (this prompt does not hit EOS that early)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == out.usage.completion_tokens == max_tokens


def test_unbounded_max_tokens_stops_at_the_context_window(make_engine: EngineFactory) -> None:
    engine = make_engine("llama", max_model_len=40)
    out = run(
        engine,
        prompt_ids(420, 30),
        SamplingParams(temperature=0.5, max_tokens=None, ignore_eos=True, seed=1),
    )
    assert out.finish_reason == "length"
    assert out.usage == Usage(prompt_tokens=30, completion_tokens=10, cached_tokens=0)


def test_eos_ends_generation_with_stop(make_engine: EngineFactory) -> None:
    engine = make_engine("llama")
    candidates = [prompt_ids(500 + s, 8) for s in range(40)]
    free_running = engine.generate(
        candidates, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    )
    hits = [
        (p, r.token_ids)
        for p, r in zip(candidates, free_running, strict=True)
        if EOS in r.token_ids[1:]
    ]
    assert hits, "no candidate prompt reaches EOS; pick other candidates"
    # Without ignore_eos, every candidate ends at its first EOS, and only there.
    bounded = engine.generate(candidates, SamplingParams(temperature=0, max_tokens=32))
    for ref, out in zip(free_running, bounded, strict=True):
        if EOS in ref.token_ids:
            k = ref.token_ids.index(EOS)
            assert out.finish_reason == "stop"
            assert out.token_ids == ref.token_ids[: k + 1]
            assert out.usage.completion_tokens == k + 1
            assert "<|im_end|>" not in out.text
        else:
            assert out.finish_reason == "length"
            assert out.token_ids == ref.token_ids


# -- sampling ------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_batch_independent(
    make_engine: EngineFactory,
) -> None:
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    ids = prompt_ids(600, 12)
    alone = run(make_engine("llama"), ids, seeded).token_ids
    assert run(make_engine("llama"), ids, seeded).token_ids == alone  # fresh engine
    engine = make_engine("llama", seed=1234)  # another engine-wide seed changes nothing
    assert run(engine, ids, seeded).token_ids == alone
    assert run(engine, ids, seeded).token_ids == alone  # the same engine, again
    mixed = engine.generate(
        [prompt_ids(601, 30), ids, prompt_ids(602, 5), ids, ids],
        [
            SamplingParams(temperature=0, max_tokens=24),
            seeded,
            SamplingParams(temperature=1.0, max_tokens=10),  # unseeded: shares the engine RNG
            seeded,
            SamplingParams(temperature=0.8, top_p=0.9, seed=8, max_tokens=24, ignore_eos=True),
        ],
    )
    assert mixed[1].token_ids == mixed[3].token_ids == alone
    # It really samples: neither greedy nor the same for another seed.
    assert alone != run(engine, ids, SamplingParams(temperature=0, max_tokens=24)).token_ids
    assert mixed[4].token_ids != alone


def test_unseeded_sampling_is_reproducible_for_the_same_engine_seed(
    make_engine: EngineFactory,
) -> None:
    prompts = [prompt_ids(610 + i, 6 + i) for i in range(4)]
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = [c.token_ids for c in make_engine("llama", seed=5).generate(prompts, params)]
    b = [c.token_ids for c in make_engine("llama", seed=5).generate(prompts, params)]
    c = [c.token_ids for c in make_engine("llama", seed=6).generate(prompts, params)]
    assert a == b
    assert a != c


# -- usage and prefix caching --------------------------------------------------------------


def test_usage_is_exact_for_every_prompt_kind(make_engine: EngineFactory) -> None:
    engine = make_engine("qwen2")
    tok = engine.tokenizer
    text = "Hello there, how are you?"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = prompt_ids(700, 21)
    prompts: list[Prompt] = [text, messages, ids]
    expected_prompt_tokens = [
        len(tok.encode(text, add_special_tokens=True)),
        len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)),
        21,
    ]
    rids = [
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
        for p in prompts
    ]
    outputs = drain(engine)
    for rid, n_prompt in zip(rids, expected_prompt_tokens, strict=True):
        seen = 0
        for out in outputs[rid]:  # every delta carries the usage so far
            seen += len(out.token_ids)
            assert out.usage.prompt_tokens == n_prompt
            assert out.usage.completion_tokens == seen
        final = outputs[rid][-1].usage
        assert final.completion_tokens == 9
        assert 0 <= final.cached_tokens <= final.prompt_tokens
        assert final.total_tokens == n_prompt + 9


def test_cached_tokens_are_a_subset_of_prompt_tokens(make_engine: EngineFactory) -> None:
    engine = make_engine("llama", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = prompt_ids(710, 16)  # a whole number of blocks
    first = run(engine, ids, params)
    again = run(engine, ids, params)
    longer = run(engine, ids + first.token_ids, params)  # a follow-up turn
    assert first.usage.cached_tokens == 0
    assert again.usage.cached_tokens == 12  # the last block is recomputed for its logits
    assert again.token_ids == first.token_ids
    # Prompt + completion of the first request: 24 tokens; its full blocks were cached.
    assert longer.usage.cached_tokens == 20
    assert longer.usage.cached_tokens <= longer.usage.prompt_tokens == 24


def test_prefix_cache_is_isolated_by_cache_salt(make_engine: EngineFactory) -> None:
    engine = make_engine("llama", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = prompt_ids(720, 30)
    runs = [
        (salt, run(engine, ids, params, cache_salt=salt))
        for salt in ("tenant-a", "tenant-b", "tenant-a", "tenant-b", "")
    ]
    assert [c.usage.cached_tokens for _, c in runs] == [0, 0, 28, 28, 0]
    assert len({tuple(c.token_ids) for _, c in runs}) == 1


def test_leak_check_reports_held_blocks(
    make_engine: EngineFactory, leak_report: Callable[[LLMEngine], str | None]
) -> None:
    engine = make_engine("llama", num_kv_blocks=8, block_size=4)
    assert leak_report(engine) is None
    seq = engine.make_request(prompt_ids(730, 10), GREEDY_16).seq
    engine.blocks.admit(seq, cached_blocks=[], num_new_tokens=10)  # behind the engine's back
    report = leak_report(engine)
    assert report is not None and "3 of 8 KV blocks" in report
    engine.blocks.release(seq)
    assert leak_report(engine) is None


# -- bugs ------------------------------------------------------------------------------


def test_generated_request_ids_never_collide_with_caller_ids(make_engine: EngineFactory) -> None:
    engine = make_engine("llama")
    engine.add_request(prompt_ids(740, 5), GREEDY_16, request_id="req-0")
    try:
        engine.add_request(prompt_ids(741, 5), GREEDY_16)  # no id given
    except InvalidRequestError as exc:
        pytest.fail(f"a request without an id was refused: {exc}")
    finally:
        drain(engine)


def test_chat_prompt_gets_bos_once_when_the_model_wants_one(
    copy_model: Callable[..., Path], make_engine: EngineFactory
) -> None:
    model_dir = copy_model("llama")
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = True
    del cfg["chat_template"]  # the fallback template renders no BOS
    cfg_path.write_text(json.dumps(cfg))
    engine = make_engine(model_dir=model_dir)
    bos = engine.tokenizer.bos_token_id
    req = engine.make_request([{"role": "user", "content": "hi"}], GREEDY_16)
    assert req.seq.prompt_ids[0] == bos and req.seq.prompt_ids[1] != bos
    raw = engine.make_request("hi", GREEDY_16)
    assert raw.seq.prompt_ids[0] == bos

"""EngineService: the engine on a background thread, streamed to callers on any thread
or event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ember_core import ContextLengthError, EngineError, InvalidRequestError, ModelNotFoundError
from ember_functions.engine import Completion, LLMEngine, RequestOutput
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import Usage
from ember_functions.service import EngineService

from .random_prompts import prompt_ids
from .streams import result_within

EngineFactory = Callable[..., LLMEngine]
TIMEOUT_S = 30.0

GREEDY_16 = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)


@pytest.fixture
def service(make_engine: EngineFactory) -> Iterator[EngineService]:
    with EngineService(make_engine("llama")) as svc:
        yield svc


@pytest.fixture
def reference(make_engine: EngineFactory) -> LLMEngine:
    """A second engine over the same model, run directly on the test thread."""
    return make_engine("llama")


def kv_blocks(service: EngineService) -> tuple[int, int]:
    """(free, total) KV blocks, read on the engine thread; the chat preamble's, which an
    idle service pins for good, count as free."""
    result: tuple[int, int] = service.call(
        lambda e: (e.blocks.num_free_blocks + e.blocks.num_pinned_blocks, e.blocks.num_blocks)
    )
    return result


def test_sync_stream_concatenates_to_the_non_streaming_result(
    service: EngineService, reference: LLMEngine
) -> None:
    prompt = "The quick brown fox"
    [ref] = reference.generate([prompt], GREEDY_16)
    outputs = list(service.submit(prompt, GREEDY_16))
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert "".join(o.text for o in outputs) == ref.text
    assert [t for o in outputs for t in o.token_ids] == ref.token_ids
    assert outputs[-1].usage == ref.usage
    assert outputs[-1].finish_reason == "length"
    # text() yields the same text, result() the same completion.
    assert "".join(service.submit(prompt, GREEDY_16).text()) == ref.text
    got = service.submit(prompt, GREEDY_16).result()
    assert (got.text, got.token_ids) == (ref.text, ref.token_ids)
    # The same prompt a third time: its first full block comes from the prefix cache.
    assert got.usage == Usage(ref.usage.prompt_tokens, 16, cached_tokens=16)


def test_stream_with_a_stop_string_matches_the_engine(
    service: EngineService, reference: LLMEngine
) -> None:
    ids = prompt_ids(12, 37)
    [free] = reference.generate(
        [ids], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    )
    stop = next(
        free.text[i : i + 2]
        for i in range(3, len(free.text) - 1)
        if free.text[i : i + 2].isascii() and free.text[i : i + 2].isprintable()
    )
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, stop=(stop,))
    [ref] = reference.generate([ids], params)
    assert ref.finish_reason == "stop"
    outputs = list(service.submit(ids, params))
    assert "".join(o.text for o in outputs) == ref.text
    assert outputs[-1].finish_reason == "stop"


def test_async_iteration(service: EngineService, reference: LLMEngine) -> None:
    prompts = [prompt_ids(900 + i, 5 + 3 * i) for i in range(3)]
    refs = reference.generate(prompts, GREEDY_16)

    async def consume(prompt: list[int]) -> list[RequestOutput]:
        return [out async for out in service.submit(prompt, GREEDY_16)]

    async def main() -> list[list[RequestOutput]]:
        return list(await asyncio.gather(*(consume(p) for p in prompts)))

    results = asyncio.run(main())
    for outs, ref in zip(results, refs, strict=True):
        assert outs[-1].finished
        assert [t for o in outs for t in o.token_ids] == ref.token_ids
        assert "".join(o.text for o in outs) == ref.text


def test_async_iteration_after_outputs_already_arrived(service: EngineService) -> None:
    """Outputs delivered before ``async for`` starts are not lost."""
    stream = service.submit(prompt_ids(905, 9), GREEDY_16)
    rid = stream.request_id
    deadline = time.monotonic() + TIMEOUT_S
    # call() runs between steps, after the previous step's outputs were delivered.
    while service.call(lambda e: rid in e._requests) and time.monotonic() < deadline:
        time.sleep(0.005)

    async def consume() -> list[RequestOutput]:
        return [out async for out in stream]

    outs = asyncio.run(consume())
    assert sum(len(o.token_ids) for o in outs) == 16
    assert outs[-1].finished


def test_cancel_from_another_thread_mid_stream(service: EngineService) -> None:
    stream = service.submit(prompt_ids(910, 10), LONG)
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    canceller = threading.Thread(target=stream.cancel)
    canceller.start()
    canceller.join(TIMEOUT_S)
    rest = list(it)
    final = rest[-1]
    assert final.finished and final.finish_reason == "cancelled"
    produced = sum(len(o.token_ids) for o in first + rest)
    assert 3 <= produced < 480
    assert final.usage.completion_tokens == produced
    assert final.usage.prompt_tokens == 10
    free, total = kv_blocks(service)
    assert free == total


def test_cancelling_an_async_consumer_cancels_the_request(service: EngineService) -> None:
    stream = service.submit(prompt_ids(911, 10), LONG)
    seen: list[RequestOutput] = []

    async def main() -> None:
        async def consume() -> None:
            async for out in stream:
                seen.append(out)

        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The cancel reached the engine: the request ended and its blocks are back.
    assert service.call(lambda e: list(e._requests)) == []
    free, total = kv_blocks(service)
    assert free == total


def test_twenty_concurrent_submitters(service: EngineService, reference: LLMEngine) -> None:
    prompts = [prompt_ids(920 + i, 4 + 2 * i) for i in range(20)]
    refs = reference.generate(prompts, GREEDY_16)
    results: list[Completion | None] = [None] * 20
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def submitter(i: int) -> None:
        try:
            barrier.wait(TIMEOUT_S)
            results[i] = service.submit(prompts[i], GREEDY_16).result()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors
    assert len({r.request_id for r in results if r is not None}) == 20
    for i, (got, ref) in enumerate(zip(results, refs, strict=True)):
        assert got is not None, f"submitter {i} got no result"
        assert got.token_ids == ref.token_ids
        assert got.usage == ref.usage
    free, total = kv_blocks(service)
    assert free == total


def test_bad_request_raises_at_submit_and_the_service_keeps_serving(
    service: EngineService, reference: LLMEngine
) -> None:
    ids = prompt_ids(930, 12)
    [ref] = reference.generate([ids], GREEDY_16)
    running = service.submit(ids, GREEDY_16)
    with pytest.raises(ContextLengthError, match="600 tokens"):
        service.submit(prompt_ids(931, 600), GREEDY_16)
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        service.submit(ids, GREEDY_16, model="nope")
    with pytest.raises(InvalidRequestError, match="empty"):
        service.submit("", GREEDY_16)
    with pytest.raises(InvalidRequestError, match="already running"):
        service.submit(ids, GREEDY_16, request_id=running.request_id)
    assert running.result().token_ids == ref.token_ids
    assert service.submit(ids, GREEDY_16).result().token_ids == ref.token_ids


def test_call_runs_on_the_engine_thread_and_reraises(service: EngineService) -> None:
    assert service.call(lambda e: threading.current_thread().name) == "ember-engine"

    def boom(engine: LLMEngine) -> Any:
        raise ValueError("from the engine thread")

    with pytest.raises(ValueError, match="from the engine thread"):
        service.call(boom)
    assert service.submit(prompt_ids(940, 5), GREEDY_16).result().usage.completion_tokens == 16


def test_close_ends_running_requests_as_cancelled(make_engine: EngineFactory) -> None:
    svc = EngineService(make_engine("llama"))
    svc.start()
    stream = svc.submit(prompt_ids(950, 8), LONG)
    it = iter(stream)
    next(it)
    svc.close()
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled"
    with pytest.raises(EngineError, match="shut down"):
        svc.submit(prompt_ids(951, 8), GREEDY_16)


def test_a_failing_step_raises_in_the_stream_and_the_service_goes_on(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine("llama")
    # The service caches the public prefix with a prefill of its own once it idles;
    # done here first, so the third execute is always this request's third step.
    engine.cache_public_prefix()
    original = engine.runner.execute
    calls = {"n": 0}

    def flaky_execute(plan: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device fault")
        return original(plan)

    monkeypatch.setattr(engine.runner, "execute", flaky_execute)
    with EngineService(engine) as svc:
        stream = svc.submit(prompt_ids(970, 8), GREEDY_16)
        with pytest.raises(EngineError, match="simulated device fault"):
            for _ in stream:
                pass
        assert len(stream.outputs) == 3  # two tokens, then the error
        assert stream.outputs[-1].finish_reason == "error"
        assert stream.outputs[-1].usage.completion_tokens == 2
        assert svc.submit(prompt_ids(971, 8), GREEDY_16).result().usage.completion_tokens == 16
        free, total = kv_blocks(svc)
        assert free == total


# -- bugs ------------------------------------------------------------------------------


def test_call_after_close_raises(make_engine: EngineFactory) -> None:
    svc = EngineService(make_engine("llama"))
    svc.start()
    svc.close()
    box: list[object] = []

    def caller() -> None:
        try:
            box.append(svc.call(lambda e: "ran"))
        except EngineError as exc:
            box.append(exc)

    t = threading.Thread(target=caller, daemon=True)
    t.start()
    t.join(1.0)
    assert box, "call() after close() never returned"
    assert isinstance(box[0], EngineError)


def test_request_submitted_while_closing_still_ends(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine("llama")
    in_step, go = threading.Event(), threading.Event()
    original_step = engine.step

    def slow_step() -> list[RequestOutput]:
        in_step.set()
        go.wait(TIMEOUT_S)
        return original_step()

    monkeypatch.setattr(engine, "step", slow_step)
    svc = EngineService(engine)
    svc.start()
    first = svc.submit(prompt_ids(960, 8), LONG)
    assert in_step.wait(TIMEOUT_S)  # the engine thread is inside a step
    late = svc.submit(prompt_ids(961, 8), GREEDY_16)  # waits in the inbox
    closer = threading.Thread(target=svc.close)
    closer.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not svc._closed.is_set() and time.monotonic() < deadline:
        time.sleep(0.001)
    go.set()
    closer.join(TIMEOUT_S)
    assert not closer.is_alive()
    assert first.result().finish_reason == "cancelled"
    # The engine thread is gone: whatever `late` will ever receive, it has by now.
    assert result_within(late, 1.0).finish_reason == "cancelled"  # it ended, not hung


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_exception_outside_the_model_step_does_not_hang_streams(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine("llama")
    original = engine.scheduler.schedule
    calls = {"n": 0}

    def flaky_schedule() -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated scheduler fault")
        return original()

    monkeypatch.setattr(engine.scheduler, "schedule", flaky_schedule)
    svc = EngineService(engine)
    svc.start()
    try:
        stream = svc.submit(prompt_ids(972, 8), GREEDY_16)
        with contextlib.suppress(Exception):  # it may end with an error; it must end
            result_within(stream, 2.0)
        later = result_within(svc.submit(prompt_ids(973, 8), GREEDY_16), 2.0)
        assert later.usage.completion_tokens == 16
    finally:
        svc.close()
        while engine.has_unfinished():  # the dead thread left the request behind
            engine.step()

"""Bad input gets a clear error, and the requests already running go on untouched.

Each case starts four good requests, lets them run a few steps, then tries one bad
request: it must raise an EmberError whose message says what is wrong, leave the
engine's state as it was, and the good requests must finish with the tokens they
would have produced anyway.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ember_core import (
    ContextLengthError,
    EmberError,
    InvalidRequestError,
    ModelNotFoundError,
)
from ember_functions.engine import LLMEngine, RequestOutput
from ember_functions.engine_config import EngineConfig
from ember_functions.sampling_params import SamplingParams
from ember_functions.scheduler import SchedulerOutput

from .random_prompts import prompt_ids

EngineFactory = Callable[..., LLMEngine]

MAX_MODEL_LEN = 64
GOOD = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


GOOD_PROMPTS = [prompt_ids(800 + i, 5 + 7 * i) for i in range(4)]  # 5 .. 26 tokens


def busy_engine(make_engine: EngineFactory) -> tuple[LLMEngine, dict[str, list[int]]]:
    """An engine in the middle of four good requests (``good-0`` .. ``good-3``)."""
    engine = make_engine("llama", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, block_size=8)
    for i, p in enumerate(GOOD_PROMPTS):
        engine.add_request(p, GOOD, request_id=f"good-{i}")
    tokens: dict[str, list[int]] = defaultdict(list)
    for _ in range(3):
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return engine, tokens


def finish(engine: LLMEngine, tokens: dict[str, list[int]]) -> dict[str, RequestOutput]:
    """Runs the engine dry; returns each request's final output (tokens accumulate)."""
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.fixture(scope="module")
def expected(tiny_model: Callable[..., Path]) -> dict[str, list[int]]:
    """What the good requests produce when nothing bad happens."""
    config = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=8)
    engine = LLMEngine.from_dir(tiny_model("llama"), config=config)
    return {f"good-{i}": c.token_ids for i, c in enumerate(engine.generate(GOOD_PROMPTS, GOOD))}


@dataclass(frozen=True)
class Case:
    name: str
    attempt: Callable[[LLMEngine], Any]
    error: type[EmberError]
    says: tuple[str, ...]  # substrings the message must contain
    param: str | None = None


CASES = [
    Case(
        "prompt-longer-than-context",
        lambda e: e.add_request(prompt_ids(1, 100), GOOD),
        ContextLengthError,
        ("100 tokens", f"{MAX_MODEL_LEN} tokens", "shorten"),
        "prompt",
    ),
    Case(
        "prompt-exactly-the-context",  # no room left for a single generated token
        lambda e: e.add_request(prompt_ids(1, MAX_MODEL_LEN), SamplingParams(max_tokens=None)),
        ContextLengthError,
        (f"{MAX_MODEL_LEN} tokens",),
        "prompt",
    ),
    Case(
        "prompt-plus-max-tokens-too-long",
        lambda e: e.add_request(prompt_ids(1, 60), SamplingParams(max_tokens=10)),
        ContextLengthError,
        ("60 tokens", "max_tokens (10)", str(MAX_MODEL_LEN), "at most 4"),
        "max_tokens",
    ),
    Case(
        "unknown-model",
        lambda e: e.add_request(GOOD_PROMPTS[0], GOOD, model="nope"),
        ModelNotFoundError,
        ("'nope'", "available: llama"),
        "model",
    ),
    Case(
        "max-tokens-zero",
        lambda e: SamplingParams(max_tokens=0),
        InvalidRequestError,
        ("max_tokens", "positive", "0"),
        "max_tokens",
    ),
    Case(
        "max-tokens-negative",
        lambda e: SamplingParams(max_tokens=-3),
        InvalidRequestError,
        ("max_tokens", "-3"),
        "max_tokens",
    ),
    Case(
        "max-tokens-float",
        lambda e: SamplingParams(max_tokens=2.5),  # type: ignore[arg-type]
        InvalidRequestError,
        ("max_tokens", "2.5"),
        "max_tokens",
    ),
    Case(
        "temperature-negative",
        lambda e: SamplingParams(temperature=-0.5),
        InvalidRequestError,
        ("temperature", "-0.5"),
        "temperature",
    ),
    Case(
        "temperature-nan",
        lambda e: SamplingParams(temperature=float("nan")),
        InvalidRequestError,
        ("temperature", "nan"),
        "temperature",
    ),
    Case(
        "top-p-zero",
        lambda e: SamplingParams(top_p=0),
        InvalidRequestError,
        ("top_p", "(0, 1]", "got 0"),
        "top_p",
    ),
    Case(
        "top-p-above-one",
        lambda e: SamplingParams(top_p=1.5),
        InvalidRequestError,
        ("top_p", "(0, 1]", "1.5"),
        "top_p",
    ),
    Case(
        "top-k-negative",
        lambda e: SamplingParams(top_k=-1),
        InvalidRequestError,
        ("top_k", "-1"),
        "top_k",
    ),
    Case(
        "seed-not-int",
        lambda e: SamplingParams(seed="7"),  # type: ignore[arg-type]
        InvalidRequestError,
        ("seed", "'7'"),
        "seed",
    ),
    Case(
        "stop-empty-string",
        lambda e: SamplingParams(stop=("",)),
        InvalidRequestError,
        ("stop", "non-empty"),
        "stop",
    ),
    Case(
        "too-many-stops",
        lambda e: SamplingParams(stop=tuple("abcdefghijklmnopq")),
        InvalidRequestError,
        ("stop", "16", "17"),
        "stop",
    ),
    Case(
        "empty-prompt", lambda e: e.add_request("", GOOD), InvalidRequestError, ("empty",), "prompt"
    ),
    Case(
        "empty-message-list",
        lambda e: e.add_request([], GOOD),
        InvalidRequestError,
        ("non-empty", "chat messages"),
        "prompt",
    ),
    Case(
        "token-id-out-of-vocab",
        lambda e: e.add_request([5, 320, 99999], GOOD),
        InvalidRequestError,
        ("320", "99999", "[0, 320)"),
        "prompt",
    ),
    Case(
        "negative-token-id",
        lambda e: e.add_request([5, -1], GOOD),
        InvalidRequestError,
        ("-1", "vocabulary"),
        "prompt",
    ),
    Case(
        "bools-are-not-token-ids",
        lambda e: e.add_request([True, False], GOOD),
        InvalidRequestError,
        ("token ids",),
        "prompt",
    ),
    Case(
        "mixed-prompt-list",
        lambda e: e.add_request([1, {"role": "user"}], GOOD),  # type: ignore[arg-type]
        InvalidRequestError,
        ("token ids", "chat messages"),
        "prompt",
    ),
    Case(
        "duplicate-request-id",
        lambda e: e.add_request(GOOD_PROMPTS[0], GOOD, request_id="good-1"),
        InvalidRequestError,
        ("'good-1'", "already running"),
        None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_and_the_batch_goes_on(
    case: Case, make_engine: EngineFactory, expected: dict[str, list[int]]
) -> None:
    engine, tokens = busy_engine(make_engine)
    free = engine.blocks.num_free_blocks
    running = [s.request_id for s in engine.scheduler.running]
    waiting = [s.request_id for s in engine.scheduler.waiting]
    with pytest.raises(case.error) as err:
        case.attempt(engine)
    message = err.value.message
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    if case.param is not None:
        assert err.value.param == case.param
    assert 400 <= err.value.http_status < 500
    # Nothing about the running batch changed...
    assert engine.blocks.num_free_blocks == free
    assert [s.request_id for s in engine.scheduler.running] == running
    assert [s.request_id for s in engine.scheduler.waiting] == waiting
    # ...and it finishes exactly as it would have.
    final = finish(engine, tokens)
    assert set(final) == set(expected)
    for rid, toks in expected.items():
        assert tokens[rid] == toks, rid
        assert final[rid].finish_reason == "length"
        assert final[rid].usage.completion_tokens == 12


def test_a_failing_step_ends_only_its_requests(
    make_engine: EngineFactory, expected: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = busy_engine(make_engine)
    original = engine.runner.execute
    calls = {"n": 0}

    def flaky_execute(plan: SchedulerOutput) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return original(plan)

    monkeypatch.setattr(engine.runner, "execute", flaky_execute)
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == sorted(expected)
    for o in outs:
        assert o.finished and o.finish_reason == "error"
        assert o.error is not None and "RuntimeError: simulated kernel failure" in o.error
        assert o.usage.completion_tokens == 3  # what was produced before the failure
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    # The engine itself lives on.
    again = engine.generate(GOOD_PROMPTS, GOOD)
    assert [c.token_ids for c in again] == [expected[f"good-{i}"] for i in range(4)]


def test_generate_with_a_bad_prompt_queues_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine("llama", max_model_len=MAX_MODEL_LEN)
    with pytest.raises(InvalidRequestError):
        engine.generate([GOOD_PROMPTS[0], ""], GOOD)
    queued = engine.has_unfinished()
    while engine.has_unfinished():  # leave the engine clean for the leak check
        engine.step()
    assert not queued, "the good prompt before the bad one was left queued"

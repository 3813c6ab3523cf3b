"""The gateway over real HTTP on 127.0.0.1: the official openai client, streaming with
usage, errors as OpenAI error bodies, money settled exactly, disconnects cancelling."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from ember_billing.models import Reservation, UsageEvent
from ember_platform.gateway import GatewayConfig

from .conftest import MODEL, Gateway

HELLO = [{"role": "user", "content": "Say something."}]


def client(gw: Gateway, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key or gw.key, max_retries=0)


def ledger(gw: Gateway) -> dict[str, Any]:
    """What the ledger holds: usage events by request id, and reservations by state."""
    with gw.billing.engine.connect() as c:
        events = dict(c.execute(select(UsageEvent.request_id, UsageEvent.completion_tokens)).all())
        states = dict(
            c.execute(select(Reservation.state, func.count()).group_by(Reservation.state)).all()
        )
    return {"events": events, "states": states}


def test_chat_completion_with_the_openai_client(gateway: Gateway) -> None:
    resp = client(gateway).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0
    )
    assert resp.object == "chat.completion" and resp.model == MODEL
    assert resp.choices[0].message.role == "assistant"
    usage = resp.usage
    assert usage is not None and 1 <= usage.completion_tokens <= 12
    prompt_ids = gateway.engine.make_request(HELLO, _greedy(12)).seq.prompt_ids
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Billed exactly what the engine generated, once.
    assert ledger(gateway)["events"] == {resp.id: gateway.generated[resp.id]}
    assert gateway.generated[resp.id] == usage.completion_tokens


def test_streamed_chat_with_include_usage_matches_the_unstreamed_answer(gateway: Gateway) -> None:
    c = client(gateway)
    whole = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])


def test_completions_endpoint_streams_and_counts(gateway: Gateway) -> None:
    c = client(gateway)
    resp = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.usage is not None
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
        if ch.choices
    )
    assert streamed == resp.choices[0].text


def test_models_health_ready_metrics_and_usage(gateway: Gateway) -> None:
    c = client(gateway)
    assert [m.id for m in c.models.list()] == [MODEL]
    c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    with httpx.Client(base_url=gateway.base_url) as h:
        assert h.get("/healthz").json() == {"status": "ok"}
        assert h.get("/readyz").status_code == 200
        metrics = h.get("/metrics").text
        assert "ember_time_to_first_token_seconds_bucket" in metrics
        assert 'ember_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics
        assert "ember_free_kv_blocks" in metrics and "ember_queue_depth" in metrics
        usage = h.get("/v1/usage", headers={"Authorization": f"Bearer {gateway.key}"}).json()
        assert usage["data"][0]["model"] == MODEL and usage["data"][0]["requests"] == 1
        schema = h.get("/openapi.json").json()
        assert "/v1/chat/completions" in schema["paths"]


def test_openai_error_types_for_401_429_400(gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory(GatewayConfig(requests_per_minute_per_key=2))
    with pytest.raises(openai.AuthenticationError) as auth:
        client(gw, key="ek_nothere_secret").chat.completions.create(model=MODEL, messages=HELLO)
    assert "ember keys create" in auth.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client(gw).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"  # type: ignore[index]
    for _ in range(2):  # the limit is 2 a minute; the refused requests above do not count
        client(gw).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as limited:
        client(gw).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_over_budget_is_402_and_runs_nothing(gateway: Gateway) -> None:
    gateway.billing.set_quota(gateway.tenant, spend_cap_micros=10)
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=50)
    assert err.value.status_code == 402 and err.value.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert gateway.generated == {} and ledger(gateway)["events"] == {}


def _greedy(n: int) -> Any:
    from ember_functions.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0)


BAD = [
    ("malformed json", b"{not json", 400, "invalid_request"),
    ("wrong type", {"model": MODEL, "messages": "hi"}, 400, "invalid_request"),
    ("unknown field", {"model": MODEL, "messages": HELLO, "wat": 1}, 400, "invalid_request"),
    ("unknown model", {"model": "gpt-9", "messages": HELLO}, 404, "model_not_found"),
    ("negative max_tokens", {"model": MODEL, "messages": HELLO, "max_tokens": -5}, 400, None),
    (
        "beyond the context window",
        {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 5000}]},
        400,
        "context_length_exceeded",
    ),
    (
        "oversized body",
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]},
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(("what", "body", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_openai_error_and_changes_nothing(
    gateway: Gateway, what: str, body: Any, status: int, code: str | None
) -> None:
    free = gateway.service.free_kv_blocks
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        content=raw,
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"},
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert gateway.generated == {}  # never reached the engine
    assert ledger(gateway) == {"events": {}, "states": {}}
    assert gateway.service.free_kv_blocks == free

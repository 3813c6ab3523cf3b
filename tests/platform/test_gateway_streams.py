"""Clients that go away mid-stream: the request is cancelled in the engine at once (its KV
blocks freed) and billed exactly the tokens the engine generated, at 200 concurrent streams."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from .conftest import MODEL, Gateway
from .test_gateway import ledger


async def _stream(
    gw: Gateway, http: httpx.AsyncClient, *, max_tokens: int, cut_after: int | None
) -> tuple[str, str]:
    """Streams one chat completion; drops the connection after ``cut_after`` chunks.
    Returns (request id, how it ended)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell me a story {random.random()}"}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {gw.key}"}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        rid = resp.headers["x-request-id"]
        assert resp.status_code == 200
        n = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return rid, "done"
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            n += 1
            if cut_after is not None and n >= cut_after:
                return rid, "cut"  # leaving the block closes the connection
    return rid, "eof"


def test_disconnect_cancels_at_once_and_bills_what_ran(gateway: Gateway) -> None:
    free = gateway.service.free_kv_blocks

    async def run() -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
            return await _stream(gateway, http, max_tokens=400, cut_after=3)

    rid, how = asyncio.run(run())
    assert how == "cut"
    gateway.wait_idle()
    generated = gateway.generated[rid]
    assert 2 <= generated < 400  # stopped early, not run to max_tokens
    assert ledger(gateway)["events"] == {rid: generated}
    assert ledger(gateway)["states"] == {"settled": 1}
    assert gateway.service.free_kv_blocks == free


@pytest.mark.slow
def test_200_concurrent_streams_with_random_disconnects(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = gateway_factory(max_num_seqs=32)
    free = gw.service.free_kv_blocks
    rng = random.Random(7)
    plans = [(rng.randint(1, 24), rng.choice([None, None, rng.randint(1, 6)])) for _ in range(200)]

    async def run() -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=120, limits=limits) as http:
            return await asyncio.gather(
                *(_stream(gw, http, max_tokens=m, cut_after=c) for m, c in plans)
            )

    results = asyncio.run(run())
    assert len({rid for rid, _ in results}) == 200
    assert all(how in ("done", "cut") for _, how in results)
    gw.wait_idle(timeout_s=120)
    book = ledger(gw)
    # Every request billed exactly once, exactly the tokens the engine generated for it.
    assert book["events"] == {rid: gw.generated.get(rid, 0) for rid, _ in results}
    assert book["states"] == {"settled": 200}
    assert gw.service.free_kv_blocks == free

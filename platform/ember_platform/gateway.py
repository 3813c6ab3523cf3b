"""The OpenAI-compatible HTTP gateway: auth, money, routing, streaming, metrics.

The path of a request (DESIGN.md): bearer key -> tenant (cached briefly); request rate
limit; body validated (pydantic: a bad request never reaches an engine); the router
tokenizes it, so the most it can cost is known; billing reserves that (402 over budget, 429
over tokens per minute); the request starts; its outputs stream back; billing settles the
engine's own usage when it ends, however it ends (``metering.Run``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember_billing.service import BillingService
from ember_core.errors import AuthenticationError, ConfigError, EmberError
from ember_functions.host_memory import read_process_memory
from ember_functions.sequence import Usage
from ember_platform import openai_protocol as oai
from ember_platform import openapi_docs as docs
from ember_platform.http_errors import (
    PayloadTooLargeError,
    PayloadTooLargeHTTP,
    error_body,
    error_response,
    install_handlers,
)
from ember_platform.limits import AuthCache, RequestRateLimiter
from ember_platform.metering import Run
from ember_platform.metrics import GatewayMetrics
from ember_platform.router import Router

__all__ = ["GatewayConfig", "create_app"]


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    max_body_bytes: int = 1 << 20
    requests_per_minute_per_key: int | None = None
    auth_cache_s: float = 5.0
    adapter: str = ""  # the adapter name billed for base-model requests

    def __post_init__(self) -> None:
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes!r}")
        rpm = self.requests_per_minute_per_key
        if rpm is not None and (not isinstance(rpm, int) or rpm < 1):
            raise ConfigError(f"requests_per_minute_per_key must be >= 1 or None, got {rpm!r}")
        if not isinstance(self.auth_cache_s, int | float) or self.auth_cache_s < 0:
            raise ConfigError(f"auth_cache_s must be >= 0, got {self.auth_cache_s!r}")


class _Edge:
    """Pure ASGI (no per-request task or buffering, unlike ``BaseHTTPMiddleware``): refuses
    bodies over ``limit`` bytes with 413 before they are read into memory, and counts
    responses by route and status."""

    def __init__(self, app: ASGIApp, *, limit: int, metrics: GatewayMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(_too_large(self.limit))
            await response(scope, receive, send)
            self.metrics.requests.labels(scope["path"], "413").inc()
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # a body without (or lying about) its length
                raise PayloadTooLargeHTTP(self.limit)
            return message

        status = [500]

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted, observed)
        finally:
            self.metrics.requests.labels(scope["path"], str(status[0])).inc()


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is over {limit} bytes, this gateway's limit; send a shorter prompt"
    )


class _Gateway:
    def __init__(self, router: Router, billing: BillingService, config: GatewayConfig) -> None:
        self.router = router
        self.billing = billing
        self.config = config
        self.metrics = GatewayMetrics()
        self.limiter = RequestRateLimiter(config.requests_per_minute_per_key)
        self.auth_cache = AuthCache(config.auth_cache_s)
        self.runs: set[Run] = set()  # started and not yet settled

    async def authenticate(self, request: Request) -> tuple[str, str]:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "no API key: send 'Authorization: Bearer ek_...'; create a key with "
                "`ember keys create`"
            )
        key = key.strip()
        who = self.auth_cache.get(key)
        if who is None:
            who = await asyncio.to_thread(self.billing.authenticate, key)
            self.auth_cache.put(key, who)
        return who

    def _settled(self, run: Run, usage: Usage, model: str) -> None:
        self.runs.discard(run)
        self.metrics.tokens_in.labels(model).inc(usage.prompt_tokens)
        self.metrics.tokens_out.labels(model).inc(usage.completion_tokens)

    async def start(self, body: oai._Sampling, prompt: Any, request: Request, prefix: str) -> Run:
        tenant, key_id = await self.authenticate(request)
        self.limiter.check(key_id)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        prepared = self.router.prepare(
            body.model, prompt, body.sampling_params(), request_id=rid, tenant=tenant
        )
        reservation = await asyncio.to_thread(
            self.billing.reserve,
            tenant,
            key_id,
            body.model,
            self.config.adapter,
            prepared.prompt_tokens,
            prepared.max_completion_tokens,
            request_id=rid,
        )
        try:
            running = self.router.start(prepared)
        except BaseException:
            await asyncio.to_thread(self.billing.release, reservation.id)
            raise
        model = body.model
        run = Run(
            running,
            billing=self.billing,
            reservation_id=reservation.id,
            prompt_tokens=prepared.prompt_tokens,
            on_settled=lambda r, u: self._settled(r, u, model),
        )
        self.runs.add(run)
        return run

    async def complete(self, run: Run, received_s: float, model: str, kind: str) -> dict[str, Any]:
        parts: list[str] = []
        finish: str | None = None
        first = True
        async for out in run.outputs():
            if first and out.text:
                self.metrics.ttft.labels(model).observe(time.perf_counter() - received_s)
                first = False
            parts.append(out.text)
            finish = out.finish_reason if out.finished else finish
        await run.settled.wait()
        usage_body = oai.usage_body(run.usage)
        rid = run.running.request_id
        build = oai.chat_response if kind == "chat" else oai.completion_response
        return build(rid, model, "".join(parts), finish, usage_body)

    async def stream(
        self, run: Run, received_s: float, model: str, kind: str, include_usage: bool
    ) -> AsyncIterator[bytes]:
        rid = run.running.request_id
        first, last_s = True, received_s
        try:
            if kind == "chat":
                yield _sse(oai.chat_chunk(rid, model, delta={"role": "assistant", "content": ""}))
            async for out in run.outputs():
                finish = out.finish_reason if out.finished else None
                if not out.text and finish is None:
                    continue
                now = time.perf_counter()
                if out.text:
                    if first:
                        self.metrics.ttft.labels(model).observe(now - received_s)
                        first = False
                    else:
                        self.metrics.itl.labels(model).observe(now - last_s)
                    last_s = now
                if kind == "chat":
                    delta = {"content": out.text} if out.text else {}
                    yield _sse(oai.chat_chunk(rid, model, delta=delta, finish=finish))
                else:
                    yield _sse(oai.completion_chunk(rid, model, text=out.text, finish=finish))
        except EmberError as exc:  # the engine failed mid-stream: say so in the stream
            yield _sse(error_body(exc.message, exc.error_type, exc.code, exc.param))
            yield b"data: [DONE]\n\n"
            return
        if include_usage:
            await run.settled.wait()
            usage = oai.usage_body(run.usage)
            chunk = (
                oai.chat_chunk(rid, model, delta=None, usage=usage)
                if kind == "chat"
                else oai.completion_chunk(rid, model, text=None, usage=usage)
            )
            yield _sse(chunk)
        yield b"data: [DONE]\n\n"


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def create_app(
    router: Router, billing: BillingService, config: GatewayConfig | None = None
) -> FastAPI:
    """The gateway as an ASGI app; run it with uvicorn (``ember serve`` does)."""
    gw = _Gateway(router, billing, config or GatewayConfig())
    app = FastAPI(title="Ember", version="0.1.0", description="OpenAI-compatible LLM gateway")
    app.state.gateway = gw
    install_handlers(app)
    docs.install_openapi(app)

    async def serve(body: oai._Sampling, prompt: Any, request: Request, kind: str) -> Response:
        received_s = time.perf_counter()
        run = await gw.start(body, prompt, request, "chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            return StreamingResponse(
                gw.stream(run, received_s, body.model, kind, body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": run.running.request_id},
            )
        return JSONResponse(await gw.complete(run, received_s, body.model, kind))

    # response_model=None everywhere: the routes build their bodies as dicts and FastAPI
    # must not re-validate them per request; ``responses`` documents them (openapi_docs).
    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=docs.CHAT,
        openapi_extra=docs.SECURED,
    )
    async def chat_completions(body: oai.ChatCompletionRequest, request: Request) -> Response:
        return await serve(body, body.prompt(), request, "chat")

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=docs.COMPLETIONS,
        openapi_extra=docs.SECURED,
    )
    async def completions(body: oai.CompletionRequest, request: Request) -> Response:
        return await serve(body, body.prompt, request, "text")

    @app.get("/v1/models", response_model=None, responses=docs.MODELS, openapi_extra=docs.SECURED)
    async def models(request: Request) -> dict[str, Any]:
        await gw.authenticate(request)
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "ember"}
                for m in gw.router.models()
            ],
        }

    @app.get("/v1/usage", response_model=None, responses=docs.USAGE, openapi_extra=docs.SECURED)
    async def usage(request: Request, period: str | None = None) -> dict[str, Any]:
        tenant, _ = await gw.authenticate(request)
        rows = await asyncio.to_thread(
            gw.billing.usage, tenant, period, ("model", "adapter", "key")
        )
        return {
            "object": "list",
            "period": period,
            "data": [
                {
                    "model": r.model,
                    "adapter": r.adapter,
                    "key": r.key,
                    "requests": r.requests,
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "completion_tokens": r.completion_tokens,
                    "cost_micros": r.cost_micros,
                }
                for r in rows
            ],
        }

    @app.get("/healthz", response_model=None, responses=docs.HEALTH)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None, responses=docs.READY)
    async def readyz() -> Response:
        ready = gw.router.ready()
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "models": gw.router.models()},
            status_code=200 if ready else 503,
        )

    @app.get("/workers", response_model=None, responses=docs.WORKERS)
    async def workers() -> dict[str, Any]:
        # Operator information, open like /metrics: bind the gateway to a private address.
        return {"object": "list", "data": await asyncio.to_thread(worker_rows, gw.router)}

    @app.get("/metrics", response_class=PlainTextResponse, responses=docs.METRICS)
    async def metrics() -> Response:
        gw.metrics.queue_depth.set(gw.router.queue_depth())
        gw.metrics.engine_ready.set(1 if gw.router.ready() else 0)
        for model, free in gw.router.free_kv_blocks().items():
            gw.metrics.free_kv_blocks.labels(model).set(free)
        gw.metrics.observe_workers(await asyncio.to_thread(worker_rows, gw.router))
        gw.metrics.observe_pools(gw.router.pool_stats())
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(_Edge, limit=gw.config.max_body_bytes, metrics=gw.metrics)
    return app


def worker_rows(router: Router) -> list[dict[str, Any]]:
    """The router's worker rows, each with its process's RAM (``private_bytes``, what
    stopping it frees; ``proportional_bytes``, its share of pages it shares; None for a
    worker still starting). The kernel walks each process's page tables for these (~13 ms
    per 2.4 GB), so handlers call this on a thread, never on the event loop."""
    rows = router.workers()
    for row in rows:
        memory = read_process_memory(int(row["pid"])) if row.get("pid") else None
        row["private_bytes"] = memory.private_bytes if memory else None
        row["proportional_bytes"] = memory.proportional_bytes if memory else None
    return rows

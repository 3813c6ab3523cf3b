"""Where an ``@llm.function`` runs: in this process (embedded), or on an Ember gateway over HTTP.

Both speak the same small protocol (``Backend``), so a function behaves the same against
either; ``backend_from_env`` picks one when a function is first called, never at import:
``EMBER_BASE_URL`` and ``EMBER_API_KEY`` set means the gateway, otherwise embedded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ember_core import (
    AuthenticationError,
    BudgetExceededError,
    EmberError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    RateLimitError,
)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Request:
    """One call, as every backend receives it."""

    model: str
    messages: Messages
    max_tokens: int | None
    temperature: float
    seed: int | None


class Backend(Protocol):
    def stream(self, request: Request) -> Iterator[str]: ...

    def astream(self, request: Request) -> AsyncIterator[str]: ...


class EmbeddedBackend:
    """Engines in this process, one per model, loaded on first use and shared by every
    function that names the model (through the weights store, as a worker loads them)."""

    def __init__(self, home: str | None = None, *, engine_config: Any = None) -> None:
        self.home = home
        self.engine_config = engine_config  # an EngineConfig; None: the engine's defaults
        self._services: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _service(self, model: str) -> Any:
        with self._lock:
            service = self._services.get(model)
            if service is None:
                from ember_functions.engine_config import EngineConfig
                from ember_functions.loading import load_engine
                from ember_functions.service import EngineService
                from ember_weights_store import ModelCatalog, default_home

                catalog = ModelCatalog(default_home() if self.home is None else Path(self.home))
                config = self.engine_config or EngineConfig()
                engine = load_engine(catalog, model, config, err=sys.stderr)
                service = EngineService(engine)
                service.start()
                self._services[model] = service
            return service

    def _submit(self, request: Request) -> Any:
        from ember_functions.sampling_params import SamplingParams

        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature, seed=request.seed
        )
        return self._service(request.model).submit(request.messages, params)

    def stream(self, request: Request) -> Iterator[str]:
        return self._submit(request).text()

    async def astream(self, request: Request) -> AsyncIterator[str]:
        async for out in self._submit(request):
            if out.text:
                yield out.text

    def close(self) -> None:
        for service in self._services.values():
            service.close()
        self._services.clear()


_STATUS_ERRORS: dict[int, type[EmberError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: BudgetExceededError,
    404: ModelNotFoundError,
    429: RateLimitError,
}


class HTTPBackend:
    """An Ember (or any OpenAI-compatible) gateway: ``/v1/chat/completions``, streamed."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 600.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout_s = timeout_s
        self._client = httpx.Client(headers=self._headers, timeout=timeout_s)

    def _body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "stream": True,
        }
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    def stream(self, request: Request) -> Iterator[str]:
        with self._client.stream(
            "POST", f"{self.base_url}/chat/completions", json=self._body(request)
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _error(resp.status_code, resp.content, resp.headers)
            for line in resp.iter_lines():
                delta = _delta(line)
                if delta:
                    yield delta

    async def astream(self, request: Request) -> AsyncIterator[str]:
        import httpx

        # A client per call: an async client's connections belong to one event loop, and
        # callers may run each call under its own ``asyncio.run``.
        async with (
            httpx.AsyncClient(headers=self._headers, timeout=self._timeout_s) as client,
            client.stream(
                "POST", f"{self.base_url}/chat/completions", json=self._body(request)
            ) as resp,
        ):
            if resp.status_code >= 400:
                await resp.aread()
                raise _error(resp.status_code, resp.content, resp.headers)
            async for line in resp.aiter_lines():
                delta = _delta(line)
                if delta:
                    yield delta


def _delta(line: str) -> str:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return ""
    chunk = json.loads(line[6:])
    if "error" in chunk:
        err = chunk["error"]
        raise EngineError(f"the gateway ended the stream: {err.get('message')}")
    choices = chunk.get("choices") or []
    return str(choices[0].get("delta", {}).get("content") or "") if choices else ""


def _error(status: int, body: bytes, headers: Any) -> EmberError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:500] or f"HTTP {status}"
    cls = _STATUS_ERRORS.get(status, EngineError)
    if cls is RateLimitError:
        return RateLimitError(message, retry_after_s=float(headers.get("retry-after", 1)))
    return cls(message)


def backend_from_env(env: dict[str, str] | None = None) -> Backend:
    """The gateway if ``EMBER_BASE_URL`` and ``EMBER_API_KEY`` are set, else embedded."""
    env = dict(os.environ) if env is None else env
    url, key = env.get("EMBER_BASE_URL"), env.get("EMBER_API_KEY")
    if url and key:
        return HTTPBackend(url, key)
    if url and not key:
        raise AuthenticationError(
            "EMBER_BASE_URL is set but EMBER_API_KEY is not; export the key `ember serve` "
            "printed (or `ember keys create`), or unset EMBER_BASE_URL to run embedded"
        )
    return EmbeddedBackend(env.get("EMBER_HOME"))

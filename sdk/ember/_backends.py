"""Where an ``@llm.function`` runs: in this process (embedded), or on an Ember gateway over HTTP.

Both speak the same small protocol (``Backend``), so a function behaves the same against
either; ``backend_from_env`` picks one when a function is first called, never at import:
``EMBER_BASE_URL`` and ``EMBER_API_KEY`` set means the gateway, otherwise embedded
(with its weights from ``EMBER_WEIGHTS_ORIGIN``, an ``s3://bucket/prefix`` that
``ember models push`` filled, where set; ``EMBER_WEIGHTS_ENDPOINT_URL`` for an S3
endpoint other than AWS's).

A request may carry the warm pool its function declared (``@llm.function(pool=...)``).
Embedded, it runs in worker processes of that pool (``ember._pools``); over HTTP the
gateway's operator owns the pools, so the declared one is ignored with one warning per
function and policy.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ember_core import (
    AuthenticationError,
    BudgetExceededError,
    EmberError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    RateLimitError,
)

if TYPE_CHECKING:
    from ember._pools import FunctionPools
    from ember_functions.loading import StoreConfig
    from ember_warmpool import PoolPolicy
    from ember_warmpool.manager import ModelPool

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Request:
    """One call, as every backend receives it."""

    model: str
    messages: Messages
    max_tokens: int | None
    temperature: float
    seed: int | None
    pool: PoolPolicy | None = None  # the function's declared pool; None: no pool
    function: str = ""  # the function's name, for messages


class Backend(Protocol):
    def stream(self, request: Request) -> Iterator[str]: ...

    def astream(self, request: Request) -> AsyncIterator[str]: ...


class EmbeddedBackend:
    """Runs functions on this machine, loading models on first use (through the weights
    store, as a worker loads them).

    A function without ``pool=`` runs on an engine in this process, one per model, shared
    by every such function that names the model. A function with ``pool=`` runs in worker
    processes of a warm pool, one pool per (model, policy), forked from one zygote per
    backend, all started on the first pooled call (see ``ember._pools``). ``close()``, and
    interpreter exit, stop the engines, the pools' workers and the zygote.

    With ``weights_origin`` (``s3://bucket/prefix``, filled by ``ember models push``),
    models come from there, as at scale: nothing is installed in the home, a pool's
    workers fetch into the host tier they share, and a model the origin lacks fails on
    the first call that names it, with the command that pushes it.

    Example::

        backend = EmbeddedBackend(engine_config=EngineConfig(num_threads=2))
        llm.use_backend(backend)
        ...
        backend.pools()     # {(model, policy): ModelPool} of the pools started so far
        backend.close()

        EmbeddedBackend(weights_origin="s3://models/team")  # the team's pushed models
    """

    def __init__(
        self,
        home: str | None = None,
        *,
        engine_config: Any = None,
        queue_timeout_s: float = 120.0,
        weights_origin: str | None = None,
        weights_endpoint_url: str | None = None,
    ) -> None:
        self.home = home
        self.engine_config = engine_config  # an EngineConfig; None: the engine's defaults
        self.queue_timeout_s = queue_timeout_s  # a pooled call's wait for a worker: then 503
        self.origin = _origin(weights_origin, weights_endpoint_url)
        self._services: dict[str, Any] = {}
        self._pools: FunctionPools | None = None
        self._lock = threading.Lock()

    def _home(self) -> Path:
        from ember_weights_store import default_home

        return default_home() if self.home is None else Path(self.home)

    def _function_pools(self) -> FunctionPools:
        with self._lock:
            if self._pools is None:
                from ember._pools import FunctionPools

                self._pools = FunctionPools(
                    self._home(),
                    engine_config=self.engine_config,
                    queue_timeout_s=self.queue_timeout_s,
                    origin=self.origin,
                )
            return self._pools

    def pools(self) -> dict[tuple[str, PoolPolicy], ModelPool]:
        """The warm pools started so far, by (model, policy)."""
        return {} if self._pools is None else self._pools.pools()

    def _service(self, model: str) -> Any:
        with self._lock:
            service = self._services.get(model)
            if service is None:
                from ember_functions.engine_config import EngineConfig
                from ember_functions.loading import load_engine
                from ember_functions.service import EngineService
                from ember_weights_store import ModelCatalog

                catalog = ModelCatalog(self._home())
                config = self.engine_config or EngineConfig()
                origin = None
                if self.origin is not None:
                    self.origin.origin_raw_size_bytes(model)  # not there: say how to push it
                    origin = self.origin.origin_tier()
                engine = load_engine(catalog, model, config, err=sys.stderr, origin=origin)
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
        if request.pool is not None:
            return self._function_pools().stream(request)
        return self._submit(request).text()

    async def astream(self, request: Request) -> AsyncIterator[str]:
        if request.pool is not None:
            async for delta in self._function_pools().astream(request):
                yield delta
            return
        async for out in self._submit(request):
            if out.text:
                yield out.text

    def close(self) -> None:
        """Stops the in-process engines, the pools' workers and the zygote. Calling a
        function afterwards starts what it needs again."""
        with self._lock:
            services, self._services = list(self._services.values()), {}
            pools = self._pools
        for service in services:
            service.close()
        if pools is not None:
            pools.close()


def _origin(weights_origin: str | None, endpoint_url: str | None) -> StoreConfig | None:
    from ember_core import ConfigError
    from ember_functions.loading import StoreConfig

    if not weights_origin:
        if endpoint_url:
            raise ConfigError(
                "weights_endpoint_url is set but weights_origin is not; set weights_origin "
                "to the s3://bucket/prefix the models were pushed to (EMBER_WEIGHTS_ORIGIN)"
            )
        return None
    return StoreConfig(origin=weights_origin, endpoint_url=endpoint_url or None)


_STATUS_ERRORS: dict[int, type[EmberError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: BudgetExceededError,
    404: ModelNotFoundError,
    429: RateLimitError,
}


_GATEWAY_POOL_SETTINGS = (
    "pool_min_warm, pool_buffer, pool_max_workers, pool_keepalive_s and pool_predictive in "
    "`ember serve`'s [serve] config (or EMBER_SERVE_POOL_*, --min-warm/--max-workers)"
)


class HTTPBackend:
    """An Ember (or any OpenAI-compatible) gateway: ``/v1/chat/completions``, streamed.

    Pools on a gateway are its operator's: they are set once per served model by
    ``ember serve``'s ``pool_*`` settings and shared by every client. A function's own
    ``pool=`` is therefore ignored here (the call itself runs unchanged), and the first
    call of each function with a given policy warns once (``UserWarning``) naming those
    settings; silence it with ``warnings.filterwarnings`` or drop ``pool=`` for HTTP.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 600.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout_s = timeout_s
        self._client = httpx.Client(headers=self._headers, timeout=timeout_s)
        self._warned: set[tuple[str, PoolPolicy]] = set()
        self._warned_lock = threading.Lock()

    def _warn_pool_ignored(self, request: Request) -> None:
        if request.pool is None:
            return
        key = (request.function, request.pool)
        with self._warned_lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(
            f"{request.function or 'this function'}(): pool= is ignored over HTTP; on the "
            f"gateway at {self.base_url} the operator's pool runs {request.model!r}, set by "
            f"{_GATEWAY_POOL_SETTINGS}",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )

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
        self._warn_pool_ignored(request)
        return self._stream(request)

    def _stream(self, request: Request) -> Iterator[str]:
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

        self._warn_pool_ignored(request)
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


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the SDK: a warning points at the
    user's line that called the function."""
    sdk = str(Path(__file__).parent)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(sdk):
        frame, level = frame.f_back, level + 1
    return level


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
    return EmbeddedBackend(
        env.get("EMBER_HOME"),
        weights_origin=env.get("EMBER_WEIGHTS_ORIGIN"),
        weights_endpoint_url=env.get("EMBER_WEIGHTS_ENDPOINT_URL"),
    )

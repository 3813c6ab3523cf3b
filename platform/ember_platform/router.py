"""How the gateway reaches workers: a ``Router`` prepares a request (tokenized and
validated, so its cost is known before it runs), starts it, streams it, and cancels it.

``LocalRouter`` puts one endpoint per model behind that interface: a worker process
(``WorkerProcess``, what ``ember serve`` runs) or an in-process ``EngineService`` (tests,
embedding). The warm-pool issue puts pools of worker processes behind the same interface,
so the gateway does not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ember_core import ModelNotFoundError
from ember_functions.prompt import Prompt
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import RequestOutput

__all__ = ["Endpoint", "LocalRouter", "Prepared", "Router", "served"]

T = TypeVar("T")


def served(table: Mapping[str, T], model: str) -> T:
    """``table[model]``, or the 404 that names the models served here."""
    found = table.get(model)
    if found is None:
        raise ModelNotFoundError(
            f"model {model!r} is not served here; available: {', '.join(sorted(table))}. "
            "List them with GET /v1/models",
            param="model",
        )
    return found


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: what billing needs to reserve, and the handle to start it."""

    request_id: str
    model: str
    prompt_tokens: int
    max_completion_tokens: int  # the most it can generate: max_tokens or the window left
    handle: object  # opaque to the gateway; the router's own

    @classmethod
    def of(cls, request_id: str, model: str, request: _EndpointRequest) -> Prepared:
        return cls(
            request_id=request_id,
            model=model,
            prompt_tokens=request.prompt_tokens,
            max_completion_tokens=request.max_tokens,
            handle=request,
        )


class RunningRequest(Protocol):
    request_id: str

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def cancel(self) -> None: ...


class _EndpointRequest(Protocol):
    @property
    def prompt_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...


class Endpoint(Protocol):
    """What serves one model: ``EngineService`` in-process, ``WorkerProcess`` out of it."""

    def prepare(
        self, prompt: Prompt, params: SamplingParams, *, request_id: str, cache_salt: str
    ) -> Any: ...

    def submit_prepared(self, request: Any) -> RunningRequest: ...

    @property
    def alive(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def free_kv_blocks(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...


class Router(Protocol):
    def models(self) -> list[str]: ...

    def prepare(
        self,
        model: str,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str,
        tenant: str,
    ) -> Prepared: ...

    def start(self, prepared: Prepared) -> RunningRequest: ...

    def ready(self) -> bool: ...

    def queue_depth(self) -> int: ...

    def free_kv_blocks(self) -> dict[str, int]: ...

    def workers(self) -> list[dict[str, Any]]:
        """One row per worker: model, worker_id, pid, state, in_flight, idle_s, cold_start."""
        ...

    def pool_stats(self) -> dict[str, dict[str, float]]:
        """Per model, cumulative: ``worker_s``, ``starts``, ``requests``, ``cold_requests``
        (see ``ModelPool.stats``); empty where nothing scales."""
        ...


class LocalRouter:
    """One endpoint per model name."""

    def __init__(self, services: Mapping[str, Endpoint]) -> None:
        self._services = dict(services)

    def models(self) -> list[str]:
        return sorted(self._services)

    def _service(self, model: str) -> Endpoint:
        return served(self._services, model)

    def prepare(
        self,
        model: str,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str,
        tenant: str,
    ) -> Prepared:
        # The tenant salts the prefix cache: one tenant's cached prompt never serves another.
        request: _EndpointRequest = self._service(model).prepare(
            prompt, params, request_id=request_id, cache_salt=f"tenant:{tenant}"
        )
        return Prepared.of(request_id, model, request)

    def start(self, prepared: Prepared) -> RunningRequest:
        return self._service(prepared.model).submit_prepared(prepared.handle)

    def ready(self) -> bool:
        return bool(self._services) and all(s.alive for s in self._services.values())

    def queue_depth(self) -> int:
        return sum(s.queue_depth for s in self._services.values())

    def free_kv_blocks(self) -> dict[str, int]:
        return {name: s.free_kv_blocks for name, s in self._services.items()}

    def workers(self) -> list[dict[str, Any]]:
        return [{"model": name, **s.describe()} for name, s in sorted(self._services.items())]

    def pool_stats(self) -> dict[str, dict[str, float]]:
        return {}  # engines in this process: nothing starts or stops

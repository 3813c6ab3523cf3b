"""``@llm.function``: a Python function that returns a prompt becomes a call to a model.

Example::

    from ember import llm

    @llm.function(model="smollm2-135m", max_tokens=32, temperature=0)
    def capital(country: str) -> str:
        return f"What is the capital of {country}? Answer in one word."

    capital("France")                      # 'Paris'
    for delta in capital.stream("Peru"):   # text as it is generated
        print(delta, end="")
    capital.map(["Chile", "Japan"])        # concurrently: they batch in the engine
    handle = capital.spawn("Italy"); handle.result()
    capital.with_options(max_tokens=8)("Spain")
    await capital.acall("Kenya")           # and astream, amap

A function may declare the warm pool its calls run on::

    @llm.function(model="smollm2-135m", pool=llm.Pool(min_warm=0, buffer=1, max_workers=2,
                                                      keepalive_s=60))
    def summarize(text: str) -> str:
        return f"Summarize in one sentence: {text}"

Embedded, its calls then run in worker processes of a pool of its own (shared with every
function that declares the same model and the same policy), started on the first call and
scaled by the policy: ``min_warm=0`` lets the workers stop after ``keepalive_s`` idle, and
the next call starts one again. ``pool`` may also be a dict of the same settings
(``{"max_workers": 2}``); see ``ember_warmpool.PoolPolicy`` for all of them
(``reserve_warmth="HOST"`` parks idle workers with the weights in RAM, promoted when
calls come). Without ``pool=`` a function runs on an engine inside this process. Over
HTTP (``EMBER_BASE_URL``) the gateway's operator owns the pools (``ember serve``'s
``pool_*`` settings): a declared pool is ignored there, with one warning per function.

A function annotated to return a pydantic model or a dataclass gets the model's JSON reply
parsed and validated into that type (the schema is sent with the prompt).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import threading
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from ember._backends import Backend, Messages, Request, backend_from_env
from ember_core import ConfigError, InvalidRequestError

if TYPE_CHECKING:
    from ember_warmpool import PoolPolicy as Pool

__all__ = ["Function", "FunctionOptions", "Handle", "Pool", "function", "use_backend"]


def __getattr__(name: str) -> Any:
    # ``llm.Pool`` is ``ember_warmpool.PoolPolicy``, imported on first use so that
    # ``from ember import llm`` stays light.
    if name == "Pool":
        from ember_warmpool import PoolPolicy

        return PoolPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_MODEL = "smollm2-135m"
_MAP_THREADS = 64  # requests in flight for .map(): they batch in the engine or gateway


@dataclass(frozen=True, kw_only=True)
class FunctionOptions:
    model: str = DEFAULT_MODEL
    max_tokens: int | None = 256
    temperature: float = 0.0
    seed: int | None = None
    system: str | None = None
    adapter: str | None = None
    session: str | None = None
    # The warm pool this function's calls run on (embedded); a dict is validated into one.
    pool: Pool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a model name, got {self.model!r}")
        mt = self.max_tokens
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise ConfigError(f"max_tokens must be a positive integer or None, got {mt!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 2:
            raise ConfigError(f"temperature must be a number from 0 to 2, got {t!r}")
        if self.adapter is not None:
            raise ConfigError(
                f"adapter={self.adapter!r}: per-customer LoRA adapters are not served yet "
                "(they arrive with the fine-tune endpoints); remove adapter= for now"
            )
        if self.session is not None:
            raise ConfigError(
                f"session={self.session!r}: session KV restore is not served yet (it arrives "
                "with the KV tier); remove session= for now"
            )
        if self.pool is not None:
            object.__setattr__(self, "pool", _pool_policy(self.pool))

    def updated(self, overrides: dict[str, Any]) -> FunctionOptions:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown options {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)


_POOL_HINT = (
    "pass pool=llm.Pool(min_warm=0, buffer=1, max_workers=2, keepalive_s=60) or a dict of "
    "the same settings, or leave pool= out to run in this process"
)


def _pool_policy(value: object) -> Pool:
    """``value`` as a validated ``PoolPolicy``, or a ConfigError that says how to fix it."""
    from ember_warmpool import PoolPolicy

    if isinstance(value, PoolPolicy):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"pool must be an llm.Pool or a dict of its settings, got "
            f"{type(value).__name__} {value!r}; {_POOL_HINT}"
        )
    try:
        return PoolPolicy.from_dict(value)
    except ConfigError as exc:
        raise ConfigError(f"pool={dict(value)!r}: {exc.message} (see help(llm.Pool))") from None
    except TypeError as exc:  # e.g. keys that are not strings
        raise ConfigError(f"pool={dict(value)!r}: {exc}; {_POOL_HINT}") from None


class _Backends:
    """The process's backend, chosen on first call (``use_backend`` replaces it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: Backend | None = None

    def get(self) -> Backend:
        with self.lock:
            if self.current is None:
                self.current = backend_from_env()
            return self.current


_backends = _Backends()


def use_backend(backend: Backend | None) -> None:
    """Run every ``@llm.function`` of this process on ``backend`` (``None``: choose again
    from the environment on the next call)."""
    with _backends.lock:
        _backends.current = backend


class Handle(Generic[R]):
    """A call started by ``.spawn()``."""

    def __init__(self, future: Future[R]) -> None:
        self._future = future

    def result(self, timeout_s: float | None = None) -> R:
        return self._future.result(timeout=timeout_s)

    def done(self) -> bool:
        return self._future.done()


class Function(Generic[P, R]):
    """What ``@llm.function`` returns: call it like the original function."""

    def __init__(self, fn: Callable[P, Any], options: FunctionOptions, output: Any) -> None:
        self._fn = fn
        self.options = options
        self._output = output  # None: text
        self.__name__ = getattr(fn, "__name__", "function")
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<llm.function {self.__name__} model={self.options.model!r}>"

    # -- building the request ------------------------------------------------------------

    def _request(self, *args: Any, **kwargs: Any) -> Request:
        prompt = self._fn(*args, **kwargs)
        messages: Messages
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt
        ):
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        else:
            raise InvalidRequestError(
                f"{self.__name__}() returned {type(prompt).__name__}; an @llm.function must "
                "return its prompt: a string, or a list of {'role': ..., 'content': ...} messages"
            )
        system = self.options.system
        if self._output is not None:
            schema = json.dumps(_schema(self._output))
            system = (system + "\n\n" if system else "") + (
                f"Reply with only a JSON object that matches this JSON schema: {schema}"
            )
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        o = self.options
        return Request(
            o.model,
            messages,
            o.max_tokens,
            o.temperature,
            o.seed,
            pool=o.pool,
            function=self.__name__,
        )

    def _finish(self, text: str) -> R:
        if self._output is None:
            return text  # type: ignore[return-value]
        return _parse(text, self._output, self.__name__)

    # -- calling -------------------------------------------------------------------------

    def _run(self, request: Request) -> R:
        return self._finish("".join(_backends.get().stream(request)))

    async def _arun(self, request: Request) -> R:
        return self._finish("".join([d async for d in _backends.get().astream(request)]))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(self._request(*args, **kwargs))

    def stream(self, *args: P.args, **kwargs: P.kwargs) -> Iterator[str]:
        """Text deltas as they are generated."""
        return _backends.get().stream(self._request(*args, **kwargs))

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> Handle[R]:
        """Starts the call and returns at once; ``.result()`` waits for it."""
        request = self._request(*args, **kwargs)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-spawn")
        future = pool.submit(self._run, request)
        pool.shutdown(wait=False)
        return Handle(future)

    def map(self, *iterables: Iterable[Any]) -> list[R]:
        """``[f(*xs) for xs in zip(*iterables)]``, all in flight at once, results in order."""
        requests = [self._request(*xs) for xs in zip(*iterables, strict=True)]
        with ThreadPoolExecutor(max_workers=min(_MAP_THREADS, max(1, len(requests)))) as pool:
            return list(pool.map(self._run, requests))

    async def acall(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._arun(self._request(*args, **kwargs))

    async def astream(self, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[str]:
        async for delta in _backends.get().astream(self._request(*args, **kwargs)):
            yield delta

    async def amap(self, *iterables: Iterable[Any]) -> list[R]:
        requests = [self._request(*xs) for xs in zip(*iterables, strict=True)]
        return list(await asyncio.gather(*(self._arun(r) for r in requests)))

    def with_options(self, **overrides: Any) -> Function[P, R]:
        """The same function with some options changed, e.g. ``f.with_options(max_tokens=8)``.

        ``pool=`` may change too: ``f.with_options(pool=llm.Pool(max_workers=4))`` runs on
        the pool of that policy, ``f.with_options(pool=None)`` in this process."""
        return Function(self._fn, self.options.updated(overrides), self._output)


def _is_structured(tp: Any) -> bool:
    if not inspect.isclass(tp):
        return False
    if dataclasses.is_dataclass(tp):
        return True
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover - pydantic ships with the platform
        return False
    return issubclass(tp, BaseModel)


def _schema(tp: Any) -> dict[str, Any]:
    from pydantic import TypeAdapter

    return TypeAdapter(tp).json_schema()


def _parse(text: str, tp: Any, name: str) -> Any:
    from pydantic import TypeAdapter, ValidationError

    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise InvalidRequestError(
            f"{name}() must return a {tp.__name__}, but the model's reply has no JSON object: "
            f"{text[:200]!r}; raise max_tokens, lower the temperature, or use a larger model"
        )
    try:
        return TypeAdapter(tp).validate_json(text[start : end + 1])
    except ValidationError as exc:
        raise InvalidRequestError(
            f"{name}() must return a {tp.__name__}, but the model's JSON does not fit it: "
            f"{exc.errors()[0].get('msg')} at {exc.errors()[0].get('loc')}; reply was "
            f"{text[start : end + 1][:200]!r}"
        ) from None


def _output_type(fn: Callable[..., Any]) -> Any:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: treat the output as text
        return None
    tp = hints.get("return")
    return tp if _is_structured(tp) else None


@overload
def function(fn: Callable[P, R], /) -> Function[P, R]: ...


@overload
def function(
    *,
    model: str = ...,
    max_tokens: int | None = ...,
    temperature: float = ...,
    seed: int | None = ...,
    system: str | None = ...,
    adapter: str | None = ...,
    session: str | None = ...,
    pool: Pool | Mapping[str, Any] | None = ...,
) -> Callable[[Callable[P, R]], Function[P, R]]: ...


def function(fn: Any = None, /, **options: Any) -> Any:
    """Turns a function that returns a prompt into a call to a model; see the module doc.

    Example::

        @llm.function(model="smollm2-135m", max_tokens=16)
        def greet(name: str) -> str:
            return f"Say hello to {name}."

        @llm.function(model="smollm2-135m", pool=llm.Pool(min_warm=0, keepalive_s=30))
        def pooled(name: str) -> str:   # runs in worker processes of its own warm pool
            return f"Say hello to {name}."

    Options are keyword-only and validated here: a bad one raises ``ConfigError`` now,
    not on the first call.
    """
    if fn is not None and not callable(fn):
        hint = (
            f"options go by keyword: @llm.function(model={fn!r})"
            if isinstance(fn, str)
            else "use it as @llm.function or @llm.function(model=..., ...)"
        )
        raise TypeError(f"@llm.function got {fn!r}, which is not a function; {hint}")
    opts = FunctionOptions().updated(options)

    def wrap(f: Callable[P, R]) -> Function[P, R]:
        if not callable(f):
            raise TypeError(f"@llm.function decorates a function, not a {type(f).__name__}")
        return Function(f, opts, _output_type(f))

    return wrap(fn) if fn is not None else wrap

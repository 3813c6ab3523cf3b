"""``@llm.function`` against both backends with the same code: embedded (an engine in this
process) and HTTP (a real gateway on 127.0.0.1). Also typed JSON output and misuse errors."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from ember import llm
from ember._backends import EmbeddedBackend, HTTPBackend, Request, backend_from_env
from ember_core import AuthenticationError, ConfigError, InvalidRequestError

from ..platform.conftest import MODEL, Gateway


@pytest.fixture(params=["embedded", "http"])
def backend(
    request: pytest.FixtureRequest,
    tiny_model: Callable[..., Path],
    gateway_factory: Callable[..., Gateway],
    tmp_path: Path,
) -> Iterator[str]:
    """Installs a backend for the test and yields the model name to use with it."""
    if request.param == "embedded":
        from ember_functions.engine_config import EngineConfig

        config = EngineConfig(num_threads=1, kv_cache_bytes=64 << 20)
        embedded = EmbeddedBackend(str(tmp_path / "home"), engine_config=config)
        llm.use_backend(embedded)
        yield str(tiny_model("llama"))
        embedded.close()
    else:
        gw = gateway_factory()
        llm.use_backend(HTTPBackend(gw.base_url, gw.key))
        yield MODEL
    llm.use_backend(None)


def test_call_stream_map_spawn_options_and_async(backend: str) -> None:
    # Seeded sampling: the tiny random model ends at once under greedy decoding.
    @llm.function(model=backend, max_tokens=8, temperature=1.0, seed=5)
    def story(topic: str, *, style: str = "plain") -> str:
        return f"Write a {style} story about {topic}."

    text = story("a cat")
    assert isinstance(text, str) and text
    assert "".join(story.stream("a cat")) == text  # greedy: the same tokens streamed
    assert story.map(["a cat", "a dog"]) == [text, story("a dog")]
    assert story.spawn("a cat").result(timeout_s=60) == text
    short = story.with_options(max_tokens=1)("a cat")
    assert len(short) <= len(text)
    assert asyncio.run(story.acall("a cat")) == text
    assert asyncio.run(story.amap(["a cat"])) == [text]

    async def collect() -> str:
        return "".join([d async for d in story.astream("a cat")])

    assert asyncio.run(collect()) == text
    assert story.__name__ == "story" and "story" in repr(story)


class City(pydantic.BaseModel):
    name: str
    population: int


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Canned:
    """A backend that answers every request with fixed text, speaking the Backend protocol;
    it records requests so the test can see the schema went into the prompt."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.requests: list[Request] = []

    def stream(self, request: Request) -> Iterator[str]:
        self.requests.append(request)
        yield from (self.reply[:5], self.reply[5:])

    async def astream(self, request: Request) -> Any:
        self.requests.append(request)
        yield self.reply


def test_structured_output_is_parsed_into_the_annotated_type() -> None:
    canned = Canned('Sure! {"name": "Paris", "population": 2100000} Hope that helps.')
    llm.use_backend(canned)
    try:

        @llm.function
        def capital(country: str) -> City:
            return f"The capital of {country}?"  # type: ignore[return-value]

        city = capital("France")
        assert city == City(name="Paris", population=2100000)
        assert "JSON schema" in canned.requests[0].messages[0]["content"]
        canned.reply = '{"x": 1, "y": "two"}'

        @llm.function
        def point() -> Point:
            return "a point"  # type: ignore[return-value]

        with pytest.raises(InvalidRequestError, match="does not fit"):
            point()
        canned.reply = "no json here"
        with pytest.raises(InvalidRequestError, match="no JSON object"):
            point()
    finally:
        llm.use_backend(None)


def test_misuse_gets_friendly_errors() -> None:
    with pytest.raises(TypeError, match=r"options go by keyword: @llm.function\(model='gpt'\)"):
        llm.function("gpt")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="not a function"):
        llm.function(42)  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="unknown options \\['max_token'\\]"):
        llm.function(max_token=3)  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="temperature"):
        llm.function(temperature=5)

    @llm.function
    def bad() -> str:
        return 42  # type: ignore[return-value]

    llm.use_backend(Canned("x"))
    try:
        with pytest.raises(InvalidRequestError, match="must return its prompt"):
            bad()
        with pytest.raises(ConfigError, match="unknown options"):
            bad.with_options(colour="red")
    finally:
        llm.use_backend(None)


def test_backend_comes_from_the_environment() -> None:
    assert isinstance(backend_from_env({}), EmbeddedBackend)
    http = backend_from_env({"EMBER_BASE_URL": "http://127.0.0.1:1", "EMBER_API_KEY": "ek_x_y"})
    assert isinstance(http, HTTPBackend) and http.base_url == "http://127.0.0.1:1/v1"
    with pytest.raises(AuthenticationError, match="EMBER_API_KEY is not"):
        backend_from_env({"EMBER_BASE_URL": "http://127.0.0.1:1"})


def test_gateway_errors_become_ember_errors(gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory()
    llm.use_backend(HTTPBackend(gw.base_url, "ek_abcdefgh_wrongsecret"))
    try:

        @llm.function(model=MODEL)
        def hello() -> str:
            return "hi"

        with pytest.raises(AuthenticationError, match="unknown API key"):
            hello()
    finally:
        llm.use_backend(None)

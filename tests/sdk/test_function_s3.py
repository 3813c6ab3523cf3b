"""``@llm.function`` on an embedded backend whose models come from S3
(``weights_origin``, or ``EMBER_WEIGHTS_ORIGIN``), as at scale: a model pushed with
``ember models push`` runs in this process and in a warm pool with nothing installed in
the backend's home; a model the origin lacks fails with the command that pushes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ember import llm
from ember._backends import EmbeddedBackend, backend_from_env
from ember_core import ConfigError


def _engine_config() -> object:
    from ember_functions.engine_config import EngineConfig

    return EngineConfig(num_threads=1, kv_cache_bytes=64 << 20)


def test_weights_origin_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        EmbeddedBackend(weights_origin="/srv/models")
    with pytest.raises(ConfigError, match="weights_origin is not"):
        EmbeddedBackend(weights_endpoint_url="http://127.0.0.1:9000")
    backend = backend_from_env(
        {
            "EMBER_HOME": "/tmp/ember-home",
            "EMBER_WEIGHTS_ORIGIN": "s3://models/team",
            "EMBER_WEIGHTS_ENDPOINT_URL": "http://127.0.0.1:9000",
        }
    )
    assert isinstance(backend, EmbeddedBackend) and backend.origin is not None
    assert backend.origin.origin == "s3://models/team"
    assert backend.origin.endpoint_url == "http://127.0.0.1:9000"
    assert isinstance(backend_from_env({}), EmbeddedBackend)
    assert backend_from_env({}).origin is None  # type: ignore[attr-defined]


@pytest.mark.slow
def test_functions_run_a_model_pushed_to_s3_in_process_and_pooled(
    tiny_model: Callable[..., Path], tmp_path: Path, s3_endpoint: str, pushed_tiny: str
) -> None:
    url = pushed_tiny

    def story(topic: str) -> str:
        return f"Write a story about {topic}."

    local = EmbeddedBackend(str(tmp_path / "local"), engine_config=_engine_config())
    llm.use_backend(local)
    try:
        want = llm.function(model=str(tiny_model("llama")), max_tokens=12, temperature=0)(story)
        expected = want("the sea")
    finally:
        llm.use_backend(None)
        local.close()

    home = tmp_path / "serving"
    backend = EmbeddedBackend(
        str(home),
        engine_config=_engine_config(),
        weights_origin=url,
        weights_endpoint_url=s3_endpoint,
    )
    llm.use_backend(backend)
    try:
        in_process = llm.function(model="tiny", max_tokens=12, temperature=0)(story)
        policy = llm.Pool(min_warm=1, buffer=0, max_workers=2, keepalive_s=30)
        pooled = llm.function(model="tiny", max_tokens=12, temperature=0, pool=policy)(story)
        assert in_process("the sea") == expected
        assert pooled("the sea") == expected
        # Nothing was installed: both came from S3.
        assert not (home / "models").exists() or not any((home / "models").iterdir())
        missing = llm.function(model="absent", max_tokens=4, pool=policy)(story)
        with pytest.raises(ConfigError, match=f"ember models push absent {url}"):
            missing("the sea")
        with pytest.raises(ConfigError, match=f"ember models push absent {url}"):
            llm.function(model="absent", max_tokens=4)(story)("the sea")
    finally:
        llm.use_backend(None)
        backend.close()

"""`ember serve` as users run it: a real process on 127.0.0.1, the bootstrap key printed once,
the official openai client against it; settings from flags, environment and a config file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from ember_core import ConfigError
from ember_platform.serve import ServeSettings
from ember_platform.serve_process import free_port, start_serve


@pytest.mark.slow
def test_ember_serve_bootstraps_a_key_once_and_answers_the_openai_client(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    args = ["--model", str(tiny_model("llama")), "--threads", "1", "--log-level", "warning"]
    server = start_serve(home, port=free_port(), args=args)
    try:
        assert server.key, server.log
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.key)
        (model,) = [m.id for m in client.models.list()]
        assert model == tiny_model("llama").name
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert resp.usage is not None and resp.usage.completion_tokens >= 1
    finally:
        assert server.stop() == 0
    # Second start: same ledger, no new tenant, no key printed again.
    again = start_serve(home, port=free_port(), args=args)
    assert again.stop() == 0
    assert again.key is None, again.log


def test_settings_precedence_and_validation(tmp_path: Path) -> None:
    config = tmp_path / "ember.toml"
    config.write_text('[serve]\nport = 9000\nmodel = "from-file"\nthreads = 2\n')
    env = {"EMBER_SERVE_PORT": "9001", "EMBER_SERVE_THREADS": "3"}
    s = ServeSettings.load({"threads": 4, "host": None}, env=env, config=config)
    assert (s.model, s.port, s.threads, s.host) == ("from-file", 9001, 4, "127.0.0.1")
    config.write_text("[serve]\nprot = 9000\n")
    with pytest.raises(ConfigError, match="unknown \\[serve\\] settings \\['prot'\\]"):
        ServeSettings.load({}, env={}, config=config)
    with pytest.raises(ConfigError, match="port must be 1-65535"):
        ServeSettings(port=70000)
    with pytest.raises(ConfigError, match="EMBER_SERVE_PORT='x' is not a int"):
        ServeSettings.load({}, env={"EMBER_SERVE_PORT": "x"}, config=None)
    # The host tier: automatic unless set; "auto" says so explicitly, 0 turns it off.
    assert ServeSettings().host_cache_mib is None
    assert (
        ServeSettings.load({}, env={"EMBER_SERVE_HOST_CACHE_MIB": "0"}, config=None).host_cache_mib
        == 0
    )
    auto = {"EMBER_SERVE_HOST_CACHE_MIB": "auto"}
    assert ServeSettings.load({}, env=auto, config=None).host_cache_mib is None
    config.write_text('[serve]\nhost_cache_mib = "auto"\n')
    assert ServeSettings.load({}, env={}, config=config).host_cache_mib is None
    config.write_text("[serve]\nhost_cache_mib = 2048\n")
    assert ServeSettings.load({}, env={}, config=config).host_cache_mib == 2048
    with pytest.raises(ConfigError, match=r'host_cache_mib must be .* or "auto"'):
        ServeSettings(host_cache_mib=-1)
    assert ServeSettings.load({"host_cache_mib": "512"}, env={}, config=None).host_cache_mib == 512
    with pytest.raises(ConfigError, match=r'host_cache_mib must be a number of MiB or "auto"'):
        ServeSettings.load({}, env={"EMBER_SERVE_HOST_CACHE_MIB": "lots"}, config=None)


def test_pool_settings_build_the_policy_and_forecaster_or_say_what_is_wrong() -> None:
    from ember_warmpool import HoltForecaster, SeasonalForecaster, Warmth

    s = ServeSettings(
        pool_min_warm=0,
        pool_max_workers=3,
        pool_reserve_warmth="host",
        pool_predictive=True,
        pool_season_s=600.0,
        pool_forecast_bucket_s=25.0,
    )
    policy = s.pool_policy()
    assert (policy.max_workers, policy.reserve_warmth, policy.predictive) == (3, Warmth.HOST, True)
    assert isinstance(s.forecaster(), SeasonalForecaster)
    assert isinstance(
        ServeSettings(pool_predictive=True, pool_season_s=0).forecaster(), HoltForecaster
    )
    assert ServeSettings().forecaster() is None  # not predictive: nothing to forecast
    with pytest.raises(ConfigError, match="unknown warmth 'warm'"):
        ServeSettings(pool_reserve_warmth="warm")
    with pytest.raises(ConfigError, match="min_warm=2 exceeds max_workers=1"):
        ServeSettings(pool_min_warm=2)
    with pytest.raises(ConfigError, match="season_s must be at least two buckets"):
        ServeSettings(pool_predictive=True, pool_season_s=60.0)

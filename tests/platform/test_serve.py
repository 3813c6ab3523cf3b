"""`ember serve` as users run it: a real process on 127.0.0.1, the bootstrap key printed once,
the official openai client against it; settings from flags, environment and a config file."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from ember_core import ConfigError
from ember_platform.serve import ServeSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(home: Path, model: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ember_platform.cli",
            "--home",
            str(home),
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "serving" in line:
            break
    for _ in range(200):  # uvicorn binds just after the "serving" line
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, lines
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("ember serve did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_ember_serve_bootstraps_a_key_once_and_answers_the_openai_client(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    home, port = tmp_path / "home", _free_port()
    proc, lines = _start(home, tiny_model("llama"), port)
    try:
        keys = re.findall(r"\b(ek_\S+)", "".join(lines))
        assert keys, "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[0])
        (model,) = [m.id for m in client.models.list()]
        assert model == tiny_model("llama").name
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert resp.usage is not None and resp.usage.completion_tokens >= 1
    finally:
        _stop(proc)
    # Second start: same ledger, no new tenant, no key printed again.
    proc, lines = _start(home, tiny_model("llama"), port)
    _stop(proc)
    assert not re.findall(r"\bek_\S+", "".join(lines))


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

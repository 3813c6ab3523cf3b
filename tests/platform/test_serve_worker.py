"""`ember serve` with its worker process killed mid-stream: the client gets a clean error,
the ledger bills exactly what was delivered, the pool replaces the worker, and
`ember pool status` shows it."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ember_platform.cli import main as cli_main
from ember_platform.serve_process import ServeProcess, free_port, start_serve


def _serve(model_dir: Path, tmp_path: Path, *, new_session: bool = False) -> ServeProcess:
    args = ["--model", str(model_dir), "--threads", "1", "--log-level", "warning"]
    return start_serve(tmp_path / "home", port=free_port(), args=args, new_session=new_session)


def _long_stream(client: openai.OpenAI, model: str, **options: Any) -> Any:
    """A streamed chat answer of up to 400 tokens: long enough to act on mid-way."""
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "count"}],
        max_tokens=400,
        temperature=0,
        stream=True,
        **options,
    )


def _workers(http: httpx.Client) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = http.get("/workers").json()["data"]
    return rows


@pytest.mark.slow
def test_worker_killed_mid_stream_errors_cleanly_bills_what_was_delivered_and_is_replaced(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = tiny_model("llama")
    server = _serve(model_dir, tmp_path)
    http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"})
    try:
        (first,) = _workers(http)
        assert first["state"] == "READY" and first["cold_start"]
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.key, max_retries=0)
        stream = _long_stream(client, model_dir.name, stream_options={"include_usage": True})
        deltas = 0
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas += 1
                    if deltas == 3:
                        os.kill(int(str(first["pid"])), signal.SIGKILL)
                if chunk.choices and chunk.choices[0].finish_reason is not None:
                    pytest.fail("the stream finished before the worker was killed")
        assert "exited with code -9" in err.value.message and "retrying" in err.value.message

        deadline = time.monotonic() + 30
        while http.get("/v1/usage").json()["data"] == []:  # settling is asynchronous
            assert time.monotonic() < deadline, "the killed request was never settled"
            time.sleep(0.05)
        (row,) = http.get("/v1/usage").json()["data"]
        assert row["requests"] == 1
        # Billed: the tokens the worker had delivered before it died, no more.
        assert deltas <= row["completion_tokens"] < 400

        # The pool (min_warm=1) replaces the worker, forked from the zygote.
        while not [w for w in _workers(http) if w["state"] == "READY"]:
            assert time.monotonic() < deadline, f"no replacement worker: {_workers(http)}"
            time.sleep(0.05)
        (second,) = _workers(http)
        assert second["worker_id"] != first["worker_id"] and second["pid"] != first["pid"]
        assert http.get("/readyz").status_code == 200
        again = client.chat.completions.create(
            model=model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert again.usage is not None and again.usage.completion_tokens >= 1
        assert http.get("/v1/usage").json()["data"][0]["requests"] == 2

        out = io.StringIO()
        assert cli_main(["pool", "status", "--url", server.base_url], stdout=out) == 0
        assert str(second["worker_id"]) in out.getvalue() and "READY" in out.getvalue()
        # Its cold start ends with its first request's first token: shown, and exported.
        header, row = out.getvalue().splitlines()[:2]
        column = header.index("first_token_s")
        assert float(row[column:].split()[0]) > 0
        metrics = http.get("/metrics").text
        assert 'ember_cold_start_seconds_count{model="' in metrics
        assert 'phase="first_token_s"' in metrics
        # Two workers started; both requests found a READY worker waiting for them.
        assert f'ember_pool_worker_starts_total{{model="{model_dir.name}"}} 2.0' in metrics
        assert f'ember_pool_requests_total{{model="{model_dir.name}",start="warm"}} 2.0' in metrics
        assert f'ember_pool_worker_seconds_total{{model="{model_dir.name}"}}' in metrics
        # The worker's RAM, from its process: its own pages, and its share of shared ones.
        assert f'ember_worker_memory_bytes{{kind="private",model="{model_dir.name}"}}' in metrics
        assert second["private_bytes"] > 0
        assert second["proportional_bytes"] >= second["private_bytes"]
    finally:
        http.close()
        assert server.stop() == 0


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_drains_and_exits(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """``systemctl stop``, ``timeout`` and a terminal signal the server, its zygote and its
    workers at once. The workers leave stopping to the server, which lets the running
    stream finish, then stops them and exits."""
    model_dir = tiny_model("llama")
    server = _serve(model_dir, tmp_path, new_session=True)
    group = os.getpgid(server.proc.pid)
    try:
        client = openai.OpenAI(
            base_url=f"{server.base_url}/v1", api_key=server.key, max_retries=0, timeout=30
        )
        stream = _long_stream(client, model_dir.name)
        finish, signalled = None, False
        for chunk in stream:
            if not signalled:
                os.killpg(group, signal.SIGTERM)
                signalled = True
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                finish = chunk.choices[0].finish_reason
        assert finish in ("length", "stop")  # drained: the answer ended, not cut off
        assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _group_alive(group):  # the zygote and the worker are gone too
            assert time.monotonic() < deadline, "processes of the server's group outlived it"
            time.sleep(0.05)
    finally:
        if server.proc.poll() is None:
            os.killpg(group, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True

"""`ember serve` with its worker process killed mid-stream: the client gets a clean error,
the ledger bills exactly what was delivered, and the gateway says it is not ready instead
of hanging or dying."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from ember_platform.serve_process import free_port, start_serve


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_worker_killed_mid_stream_errors_cleanly_and_bills_what_was_delivered(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = tiny_model("llama")
    args = ["--model", str(model_dir), "--threads", "1", "--log-level", "warning"]
    server = start_serve(tmp_path / "home", port=free_port(), args=args)
    try:
        (worker_pid,) = _children(server.proc.pid)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.key, max_retries=0)
        stream = client.chat.completions.create(
            model=model_dir.name,
            messages=[{"role": "user", "content": "count"}],
            max_tokens=400,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        deltas = 0
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas += 1
                    if deltas == 3:
                        os.kill(worker_pid, signal.SIGKILL)
                if chunk.choices and chunk.choices[0].finish_reason is not None:
                    pytest.fail("the stream finished before the worker was killed")
        assert "exited with code -9" in err.value.message and "retrying" in err.value.message

        http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}
        )
        deadline = time.monotonic() + 10
        while http.get("/v1/usage").json()["data"] == []:  # settling is asynchronous
            assert time.monotonic() < deadline, "the killed request was never settled"
            time.sleep(0.05)
        (row,) = http.get("/v1/usage").json()["data"]
        assert row["requests"] == 1
        # Billed: the tokens the worker had delivered before it died, no more.
        assert deltas <= row["completion_tokens"] < 400

        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        again = http.post(
            "/v1/chat/completions",
            json={"model": model_dir.name, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert again.status_code == 503, again.text
        error = again.json()["error"]
        assert error["code"] == "worker_unavailable" and "exited with code -9" in error["message"]
        assert http.get("/v1/usage").json()["data"][0]["requests"] == 1  # nothing more billed
    finally:
        assert server.stop() == 0

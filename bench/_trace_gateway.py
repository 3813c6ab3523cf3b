"""bench/trace.py's gateways: one ``ember serve`` process per pool policy, and what the
bench reads of it (its models, its workers, its pool counters from /metrics)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any


def _toml(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    return "[serve]\n" + "".join(f"{k} = {fmt(v)}\n" for k, v in values.items())


_COUNTER = re.compile(r'^(ember_pool_\w+?)_total\{model="[^"]*"(?:,start="(\w+)")?\} (\S+)$')


def pool_counters(metrics_text: str) -> dict[str, float]:
    """``worker_seconds``, ``worker_starts``, ``requests_warm``, ``requests_cold`` from a
    gateway's /metrics (summed over models: the bench serves one)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = _COUNTER.match(line)
        if m:
            name = m.group(1).removeprefix("ember_pool_") + (f"_{m.group(2)}" if m.group(2) else "")
            out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


class Gateway:
    """One ``ember serve`` process with a pool policy, and a plain HTTP client on it."""

    def __init__(self, model: str, home: Path, tmp: Path, name: str, serve: dict[str, Any]):
        from ember_platform.serve_process import free_port, start_serve

        config = tmp / f"{name}.toml"
        config.write_text(_toml(serve))
        self.server = start_serve(
            home,
            port=free_port(),
            args=[
                "--model", model, "--config", str(config), "--log-level", "warning",
                "--ledger-url", f"sqlite:///{tmp / f'{name}.db'}",
            ],
        )  # fmt: skip
        if self.server.key is None:
            raise RuntimeError(f"ember serve printed no key:\n{self.server.log}")
        self.key: str = self.server.key
        self.port = int(self.server.base_url.rsplit(":", 1)[1])
        try:
            self.model = self.get("/v1/models")["data"][0]["id"]
        except BaseException:
            self.stop()
            raise

    def get(self, path: str) -> Any:
        import httpx

        auth = {"Authorization": f"Bearer {self.key}"}
        resp = httpx.get(self.server.base_url + path, headers=auth, timeout=30)
        resp.raise_for_status()
        return resp.json() if "json" in resp.headers.get("content-type", "") else resp.text

    def counters(self) -> dict[str, float]:
        return pool_counters(self.get("/metrics"))

    def wait_ready_workers(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(w["state"] == "READY" for w in self.get("/workers")["data"]) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers never became READY: {self.get('/workers')}")
            time.sleep(0.1)

    def body(self, i: int, max_tokens: int) -> bytes:
        return json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": f"Say something about the number {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
        ).encode()

    def stop(self) -> None:
        self.server.stop()

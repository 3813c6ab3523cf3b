"""A real gateway on 127.0.0.1: uvicorn in a thread, a tiny random model in an engine
thread, a SQLite ledger with one tenant, one priced model and one API key."""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from ember_billing.service import BillingConfig, BillingService
from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.service import EngineService
from ember_platform.gateway import GatewayConfig, create_app
from ember_platform.router import LocalRouter

MODEL = "tiny"


@dataclass
class Gateway:
    base_url: str
    key: str
    tenant: str
    billing: BillingService
    service: EngineService
    generated: dict[str, int]  # request id -> tokens the engine emitted, tapped at step()
    app: Any

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until every started request has ended and been settled."""
        deadline = time.monotonic() + timeout_s
        while self.app.state.gateway.runs or self.service.queue_depth:
            if time.monotonic() > deadline:
                raise TimeoutError("requests still running or unsettled")
            time.sleep(0.02)

    @property
    def engine(self) -> LLMEngine:
        return self.service.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tap(engine: LLMEngine, generated: dict[str, int]) -> None:
    """Counts every token the engine emits per request, independently of the usage the
    engine reports, so a test can check billing against what really ran."""
    step = engine.step

    def counted() -> Any:
        outs = step()
        for out in outs:
            if out.request_id.startswith("public-prefix-"):
                continue  # the engine's own prefill of the chat preamble: nobody's request
            generated[out.request_id] = generated.get(out.request_id, 0) + len(out.token_ids)
        return outs

    engine.step = counted  # type: ignore[method-assign]


@pytest.fixture
def gateway_factory(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    started: list[tuple[uvicorn.Server, threading.Thread, EngineService, BillingService]] = []

    def make(config: GatewayConfig | None = None, *, max_num_seqs: int = 16) -> Gateway:
        engine = LLMEngine.from_dir(
            tiny_model("llama"),
            # A tiny model needs a tiny KV cache; the 1 GiB default, once per test, adds up.
            config=EngineConfig(max_num_seqs=max_num_seqs, num_threads=1, kv_cache_bytes=64 << 20),
            model_name=MODEL,
        )
        generated: dict[str, int] = {}
        _tap(engine, generated)
        service = EngineService(engine)
        service.start()
        billing = BillingService(
            f"sqlite:///{tmp_path / f'ledger-{len(started)}.db'}",
            config=BillingConfig(durable=False),
        )
        billing.create_tenant("acme")
        key, _ = billing.create_key("acme")
        billing.set_price(
            MODEL, input_micros=1_000_000, cached_input_micros=500_000, output_micros=2_000_000
        )
        app = create_app(LocalRouter({MODEL: service}), billing, config)
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start within 20 s")
            time.sleep(0.02)
        started.append((server, thread, service, billing))
        return Gateway(f"http://127.0.0.1:{port}", key, "acme", billing, service, generated, app)

    yield make
    for server, thread, service, billing in started:
        server.should_exit = True
        thread.join(timeout=20)
        service.close()
        billing.close()
    started.clear()
    gc.collect()  # the step() tap is a reference cycle through the engine and its KV cache


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory()

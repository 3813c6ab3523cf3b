"""Gateway overhead: time to first token through ``ember serve`` against the engine itself.

    python bench/gateway.py --json /tmp/gateway_bench.json [--model smollm2-135m] [--quick]

At 1, 8 and 32 concurrent streaming clients (closed loop: each client sends its next request
when the previous one ends), the same prompts go (a) straight to an in-process
``EngineService`` (the issue's baseline, "direct"), (b) to the same engine in a worker process
driven through ``WorkerProcess`` (no HTTP: what the process hop costs or saves), and (c)
through ``ember serve`` (HTTP, auth, reserve and settle in a SQLite ledger with durable
commits, SSE, then the same kind of worker process). Time to first token is measured from
sending the request to receiving the first non-empty text delta. Only one path runs at a
time; rounds alternate, medians of the percentiles are reported. Overhead = gateway - direct;
``overhead_vs_worker`` = gateway - worker is what the HTTP layers alone add.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proc import cpu_s

LEVELS = (1, 8, 32)
PATHS = ("direct", "worker", "gateway")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def prompts(n: int) -> list[list[dict[str, str]]]:
    topics = ["rivers", "bread", "clocks", "owls", "glass", "maps", "tea", "bells"]
    return [
        [{"role": "user", "content": f"Tell me one fact about {topics[i % 8]} (#{i})."}]
        for i in range(n)
    ]


async def run_direct(endpoint: Any, level: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """Closed-loop clients on an ``EngineService`` or a ``WorkerProcess`` (same surface)."""
    from ember_functions.sampling_params import SamplingParams

    # What the gateway path asks for too (the OpenAI API has no ignore_eos): same tokens.
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    ttfts: list[float] = []
    work = prompts(level * per_client)

    async def client(k: int) -> None:
        for i, p in enumerate(work[k::level]):
            t0 = time.perf_counter()
            first = True
            rid = f"bench-{k}-{i}-{time.monotonic_ns()}"
            stream = endpoint.submit_prepared(endpoint.prepare(p, params, request_id=rid))
            async for out in stream:
                if first and out.text:
                    ttfts.append(time.perf_counter() - t0)
                    first = False

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(level)))
    return {"ttft": ttfts, "wall_s": time.perf_counter() - t0, "requests": len(work)}


_FIRST_TEXT = b'"delta":{"content":"'


async def stream_ttft(port: int, key: str, body: bytes, *, since: float | None = None) -> float:
    """One streamed chat completion over a bare HTTP/1.1 connection; returns seconds from
    ``since`` (a ``perf_counter`` time; default: now) to the first non-empty content delta.
    A byte scan instead of an HTTP library: on a 2-core box the client shares the cores
    with the server, and its parsing cost is not the gateway's."""
    t0 = time.perf_counter() if since is None else since
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer.write(head + body)
    ttft = -1.0
    tail = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        if ttft < 0:
            window = tail + data
            at = window.find(_FIRST_TEXT)
            while at >= 0:
                nxt = at + len(_FIRST_TEXT)
                if nxt < len(window) and window[nxt : nxt + 1] != b'"':
                    ttft = time.perf_counter() - t0
                    break
                at = window.find(_FIRST_TEXT, nxt)
            tail = window[-64:]
    writer.close()
    if ttft < 0:
        raise RuntimeError("the gateway's stream had no text delta")
    return ttft


async def run_gateway(
    port: int, key: str, model: str, level: int, per_client: int, max_tokens: int
) -> dict[str, Any]:
    ttfts: list[float] = []
    work = prompts(level * per_client)

    async def client(k: int) -> None:
        for p in work[k::level]:
            body = {
                "model": model,
                "messages": p,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
            ttfts.append(await stream_ttft(port, key, json.dumps(body).encode()))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(level)))
    return {"ttft": ttfts, "wall_s": time.perf_counter() - t0, "requests": len(work)}


async def gateway_round(
    port: int, key: str, model: str, per_client: int, max_tokens: int, server_pid: int
) -> dict[int, dict[str, Any]]:
    """Each level's run, with the CPU the gateway process (not its worker) spent on it."""
    out: dict[int, dict[str, Any]] = {}
    for level in LEVELS:
        before = cpu_s(server_pid)
        run = await run_gateway(port, key, model, level, _per(level, per_client), max_tokens)
        after = cpu_s(server_pid)
        if before is not None and after is not None:
            run["gateway_cpu_s"] = after - before
        out[level] = run
    return out


def _per(level: int, per_client: int) -> int:
    return max(per_client, -(-16 // level))  # at least 16 requests per level


def start_server(model: str, home: Path, ledger: Path, threads: int) -> tuple[Any, str, str]:
    from ember_platform.serve_process import free_port, start_serve

    server = start_serve(
        home,
        port=free_port(),
        args=[
            "--model",
            model,
            "--ledger-url",
            f"sqlite:///{ledger}",
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
    )
    if server.key is None:
        raise RuntimeError(f"ember serve printed no key:\n{server.log}")
    return server, server.base_url, server.key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-client", type=int, default=4, help="requests each client sends")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one round, two requests per client")
    args = ap.parse_args()
    rounds, per_client = (1, 2) if args.quick else (args.rounds, args.per_client)

    from ember_functions.engine_config import EngineConfig
    from ember_functions.loading import load_engine
    from ember_functions.service import EngineService
    from ember_functions.worker_process import WorkerProcess
    from ember_weights_store import ModelCatalog, default_home

    home = default_home()
    catalog = ModelCatalog(home)
    config = EngineConfig(num_threads=args.threads, max_num_seqs=32)
    engine = load_engine(catalog, args.model, config, err=sys.stderr)
    model_name = engine.model_name
    service = EngineService(engine)
    service.start()
    worker = WorkerProcess.spawn(
        worker_id=f"bench-{os.getpid()}", model=args.model, home=home, engine_config=config
    )
    endpoints = {"direct": service, "worker": worker}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {p: {} for p in PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        server, base, key = start_server(args.model, home, Path(tmp) / "ledger.db", args.threads)
        try:
            # Warm-up on every path: first calls pay for allocations and lazy imports.
            for endpoint in endpoints.values():
                asyncio.run(run_direct(endpoint, 2, 1, args.max_tokens))
            for r in range(rounds):
                for path, endpoint in endpoints.items():
                    for level in LEVELS:
                        d = asyncio.run(
                            run_direct(endpoint, level, _per(level, per_client), args.max_tokens)
                        )
                        results[path].setdefault(level, []).append(d)
                port = int(base.rsplit(":", 1)[1])
                g = asyncio.run(
                    gateway_round(
                        port, key, model_name, per_client, args.max_tokens, server.proc.pid
                    )
                )
                for level in LEVELS:
                    results["gateway"].setdefault(level, []).append(g[level])
                print(f"round {r + 1}/{rounds} done", flush=True)
        finally:
            server.stop()
            service.close()
            worker.close()

    out: dict[str, Any] = {
        "model": model_name,
        "rounds": rounds,
        "per_client": per_client,
        "max_tokens": args.max_tokens,
        "levels": {},
    }
    print(f"\nTTFT ms (median over rounds), {model_name}, {args.max_tokens} tokens per request")
    print(
        f"{'clients':>7} {'pct':>4} {'direct':>8} {'worker':>8} {'gateway':>8} "
        f"{'gw-direct':>10} {'gw-worker':>10}   req/s direct / worker / gateway"
    )
    for level in LEVELS:
        row: dict[str, float] = {}
        for path in PATHS:
            runs = results[path][level]
            row[f"{path}_p50_ms"] = statistics.median(_pct(x["ttft"], 0.5) for x in runs) * 1e3
            row[f"{path}_p99_ms"] = statistics.median(_pct(x["ttft"], 0.99) for x in runs) * 1e3
            row[f"{path}_req_s"] = statistics.median(x["requests"] / x["wall_s"] for x in runs)
        cpu = [
            x["gateway_cpu_s"] / x["requests"]
            for x in results["gateway"][level]
            if "gateway_cpu_s" in x
        ]
        if cpu:
            row["gateway_cpu_ms_per_request"] = statistics.median(cpu) * 1e3
        for q in ("p50", "p99"):
            row[f"overhead_{q}_ms"] = row[f"gateway_{q}_ms"] - row[f"direct_{q}_ms"]
            row[f"overhead_vs_worker_{q}_ms"] = row[f"gateway_{q}_ms"] - row[f"worker_{q}_ms"]
            rates = " / ".join(f"{row[f'{p}_req_s']:.2f}" for p in PATHS) if q == "p50" else ""
            print(
                f"{level:>7} {q:>4} {row[f'direct_{q}_ms']:>8.1f} {row[f'worker_{q}_ms']:>8.1f} "
                f"{row[f'gateway_{q}_ms']:>8.1f} {row[f'overhead_{q}_ms']:>+10.1f} "
                f"{row[f'overhead_vs_worker_{q}_ms']:>+10.1f}   {rates}"
            )
        out["levels"][level] = row
    lv = out["levels"]
    out["overhead_ttft_p50_ms_c1"] = lv[1]["overhead_p50_ms"]
    out["overhead_ttft_p99_ms_c32"] = lv[32]["overhead_p99_ms"]
    out["requests_per_s_c32"] = lv[32]["gateway_req_s"]
    out["requests_per_s_c32_direct"] = lv[32]["direct_req_s"]
    out["overhead_vs_worker_ttft_p50_ms_c1"] = lv[1]["overhead_vs_worker_p50_ms"]
    out["overhead_vs_worker_ttft_p99_ms_c32"] = lv[32]["overhead_vs_worker_p99_ms"]
    print(f"\noverhead_ttft_p50_ms_c1 {out['overhead_ttft_p50_ms_c1']:.1f} (target <= 3)")
    print(f"overhead_ttft_p99_ms_c32 {out['overhead_ttft_p99_ms_c32']:.1f} (target <= 20)")
    print(
        f"gateway - worker process: p50 at 1 client {out['overhead_vs_worker_ttft_p50_ms_c1']:+.1f}"
        f" ms, p99 at 32 {out['overhead_vs_worker_ttft_p99_ms_c32']:+.1f} ms"
    )
    cpu_row = [lv[level].get("gateway_cpu_ms_per_request") for level in LEVELS]
    if all(c is not None for c in cpu_row):
        print(
            "gateway process CPU per request (ms) at "
            + ", ".join(f"c{level}: {c:.1f}" for level, c in zip(LEVELS, cpu_row, strict=True))
        )
    print(
        f"requests_per_s_c32 {out['requests_per_s_c32']:.2f} "
        f"(direct {out['requests_per_s_c32_direct']:.2f})"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

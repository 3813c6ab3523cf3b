"""Prometheus metrics of one gateway, in a registry of its own (no process-global state, so
two gateways in one process, as in the tests, never mix their counts)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

__all__ = ["GatewayMetrics"]

_COLD_START_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# Latency buckets, seconds: a CPU engine's TTFT spans milliseconds to many seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ember_requests",
            "Requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "ember_time_to_first_token_seconds",
            "From request received to first token sent",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ember_inter_token_latency_seconds",
            "Between consecutive streamed deltas",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.tokens_in = Counter(
            "ember_prompt_tokens", "Prompt tokens of settled requests", ["model"], registry=r
        )
        self.tokens_out = Counter(
            "ember_completion_tokens",
            "Completion tokens of settled requests",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "ember_queue_depth", "Requests waiting or running in the engines", registry=r
        )
        self.engine_ready = Gauge(
            "ember_engine_ready", "1 when every engine is running, else 0", registry=r
        )
        self.free_kv_blocks = Gauge(
            "ember_free_kv_blocks", "Free KV cache blocks", ["model"], registry=r
        )

        self.workers = Gauge(
            "ember_workers", "Worker processes by model and state", ["model", "state"], registry=r
        )
        self.worker_memory = Gauge(
            "ember_worker_memory_bytes",
            "RAM of the workers of a model, summed: kind=private is what stopping them frees, "
            "kind=proportional their share of every page they map (sums to what they hold)",
            ["model", "kind"],
            registry=r,
        )
        self.cold_start = Histogram(
            "ember_cold_start_seconds",
            "Phases of worker cold starts (spawn, imports, load, manifest, fetch, ..., ready, "
            "first_token: its first request's)",
            ["model", "phase"],
            buckets=_COLD_START_BUCKETS,
            registry=r,
        )
        # Phases observed, per (model, worker id): a worker's first token comes after its
        # other phases, so each phase is observed once, when it first appears.
        self._cold_start_phases_seen: dict[tuple[str, str], set[str]] = {}
        self._pools = _PoolCounters(registry=r)

    def observe_pools(self, stats: dict[str, dict[str, float]]) -> None:
        """The pools' cumulative counters (``Router.pool_stats``), exported as they are."""
        self._pools.stats = stats

    def observe_workers(self, rows: list[dict[str, Any]]) -> None:
        """Sets the worker gauges (counts by state; RAM by model, from ``worker_rows``), and
        records each worker's cold start the first time the worker is seen (a histogram,
        not a label per worker: ids are unbounded)."""
        self.workers.clear()
        self.worker_memory.clear()
        counts: dict[tuple[str, str], int] = {}
        memory: dict[tuple[str, str], int] = {}
        for row in rows:
            key = (row["model"], row["state"])
            counts[key] = counts.get(key, 0) + 1
            for kind in ("private", "proportional"):
                size = row.get(f"{kind}_bytes")
                if size is not None:
                    memory[(row["model"], kind)] = memory.get((row["model"], kind), 0) + size
            seen = self._cold_start_phases_seen.setdefault((row["model"], row["worker_id"]), set())
            for phase, seconds in (row["cold_start"] or {}).items():
                if phase not in seen:
                    seen.add(phase)
                    self.cold_start.labels(row["model"], phase).observe(seconds)
        for (model, state), n in counts.items():
            self.workers.labels(model, state).set(n)
        for (model, kind), size in memory.items():
            self.worker_memory.labels(model, kind).set(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCounters:
    """Counters whose source of truth is the pool (it counts under its own lock): they
    are read at scrape time rather than incremented twice."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        self.stats: dict[str, dict[str, float]] = {}
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        worker_s = CounterMetricFamily(
            "ember_pool_worker_seconds",
            "Seconds summed over every worker process of the pool, whatever its state",
            labels=["model"],
        )
        starts = CounterMetricFamily(
            "ember_pool_worker_starts", "Worker processes started", labels=["model"]
        )
        requests = CounterMetricFamily(
            "ember_pool_requests",
            "Requests placed on a worker; start=cold if it waited on the worker becoming READY",
            labels=["model", "start"],
        )
        for model, s in sorted(self.stats.items()):
            worker_s.add_metric([model], s["worker_s"])
            starts.add_metric([model], s["starts"])
            requests.add_metric([model, "warm"], s["requests"] - s["cold_requests"])
            requests.add_metric([model, "cold"], s["cold_requests"])
        yield from (worker_s, starts, requests)

"""The gateway's Prometheus metrics of its workers: each cold-start phase is observed once
per worker, the first token too, which comes after the others."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ember_platform.metrics import GatewayMetrics


def _cold_start_counts(metrics: GatewayMetrics) -> dict[str, float]:
    """Observations of ``ember_cold_start_seconds`` per phase."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "ember_cold_start_seconds_count":
                counts[sample.labels["phase"]] = sample.value
    return counts


def _row(worker_id: str, cold_start: dict[str, float]) -> dict[str, Any]:
    return {"model": "m", "worker_id": worker_id, "state": "READY", "cold_start": cold_start}


def test_each_phase_of_a_workers_cold_start_is_observed_once_the_first_token_when_it_comes() -> (
    None
):
    metrics = GatewayMetrics()
    ready = {"spawn_s": 0.01, "load_s": 0.3, "ready_s": 0.35}
    metrics.observe_workers([_row("w1", ready)])
    metrics.observe_workers([_row("w1", ready)])  # read again: nothing new
    assert _cold_start_counts(metrics) == {"spawn_s": 1, "load_s": 1, "ready_s": 1}

    # Its first request's first token, and a second worker starting.
    served = {**ready, "first_token_s": 0.05}
    metrics.observe_workers([_row("w1", served), _row("w2", ready)])
    metrics.observe_workers([_row("w1", served), _row("w2", ready)])
    assert _cold_start_counts(metrics) == {
        "spawn_s": 2,
        "load_s": 2,
        "ready_s": 2,
        "first_token_s": 1,
    }

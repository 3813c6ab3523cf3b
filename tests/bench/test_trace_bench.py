"""bench/trace.py runs end to end (--quick: two 12 s days) through real ``ember serve``
processes and writes the keys the warm-pool issue asks for; the fixed pool never cold
starts and scale-to-zero does. SmolLM2, as in the gateway bench: TTFT is timed to the
first non-empty text delta, which a random model may never produce."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _trace_gateway() -> ModuleType:
    """bench/_trace_gateway.py, loaded by path: bench/ is no package."""
    path = ROOT / "bench" / "_trace_gateway.py"
    spec = importlib.util.spec_from_file_location("ember_bench_trace_gateway", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pool_counters_are_read_from_the_gateways_metrics() -> None:
    text = "\n".join(
        [
            "# TYPE ember_pool_worker_seconds_total counter",
            'ember_pool_worker_seconds_total{model="m"} 12.5',
            'ember_pool_worker_starts_total{model="m"} 3.0',
            'ember_pool_requests_total{model="m",start="warm"} 7.0',
            'ember_pool_requests_total{model="m",start="cold"} 2.0',
            'ember_pool_worker_seconds_created{model="m"} 1.7e9',
        ]
    )
    assert _trace_gateway().pool_counters(text) == {
        "worker_seconds": 12.5,
        "worker_starts": 3.0,
        "requests_warm": 7.0,
        "requests_cold": 2.0,
    }


@pytest.mark.slow
def test_trace_bench_quick_writes_its_json(
    tmp_path: Path, ember_test_home: Path, smollm2_dir: Path
) -> None:
    out = tmp_path / "trace.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "trace.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "EMBER_HOME": str(ember_test_home)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for policy in ("zero", "fixed", "predictive"):
        for key in ("p99_ttft_s", "worker_s", "cold_share"):
            value = r[f"{key}_{policy}"]
            assert isinstance(value, float) and math.isfinite(value), (key, policy)
        assert r[f"failed_{policy}"] == 0
        assert 0 < r[f"p50_ttft_s_{policy}"] <= r[f"p99_ttft_s_{policy}"]
    for key in (
        "p99_ratio_predictive_vs_fixed",
        "worker_s_ratio_predictive_vs_fixed",
        "cold_share_ratio_predictive_vs_zero",
    ):
        assert isinstance(r[key], float), key
    # The fixed pool holds its workers from the start: no request waits on a cold start,
    # and it pays for every worker over the whole measured window (every day but the first).
    assert r["cold_share_fixed"] == 0.0 and r["starts_fixed"] == 0
    n_fixed = r["pools"]["fixed"]["pool_min_warm"]
    window_s = r["scenario"]["day_s"] * (r["scenario"]["days"] - 1)
    assert r["worker_s_fixed"] == pytest.approx(n_fixed * window_s, rel=0.1)
    # Its gateways' host tier had a budget set for them, kept across their restarts: the
    # bench gives that RAM back once the last one has stopped.
    from ember_weights_store import ModelCatalog
    from ember_weights_store.host_tier import HostTier

    root = ModelCatalog(ember_test_home).host_cache_root
    assert "MiB of" in proc.stdout and "host tier" in proc.stdout
    assert not root.is_dir() or HostTier(root, budget_bytes=1).keys() == []

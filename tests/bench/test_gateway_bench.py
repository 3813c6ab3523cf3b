"""bench/gateway.py runs end to end (--quick, 4 tokens a request so CI stays fast) and writes
the keys the issue and bench/README.md promise, for all three paths. SmolLM2, not a tiny
random model: TTFT is timed to the first non-empty text delta, which a random model may
never produce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gateway_bench_quick_writes_its_json(
    tmp_path: Path, ember_test_home: Path, smollm2_dir: Path
) -> None:
    out = tmp_path / "gateway.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gateway.py"),
            *("--quick", "--json", str(out), "--max-tokens", "4"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EMBER_HOME": str(ember_test_home)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in (
        "overhead_ttft_p50_ms_c1",
        "overhead_ttft_p99_ms_c32",
        "overhead_vs_worker_ttft_p50_ms_c1",
        "overhead_vs_worker_ttft_p99_ms_c32",
    ):
        assert isinstance(result[key], float), key
    assert result["requests_per_s_c32"] > 0
    for level in ("1", "8", "32"):
        row = result["levels"][level]
        for path in ("direct", "worker", "gateway"):
            assert 0 < row[f"{path}_p50_ms"] <= row[f"{path}_p99_ms"], (level, path)

"""bench/billing.py runs end to end (tiny counts) and writes the keys its README
promises; its own ledger check would exit non-zero on a wrong ledger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_billing_bench_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "billing.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "billing.py"), "--json", str(out),
         "--events", "300", "--naive", "10"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for key in ("events_per_s_sqlite", "events_per_s_postgres", "ratio_vs_naive_postgres",
                "ratio_vs_naive_sqlite", "naive_events_per_s_postgres"):  # fmt: skip
        assert data[key] > 0, key
    assert "| postgres |" in proc.stdout

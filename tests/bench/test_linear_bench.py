"""bench/linear.py runs and writes, per row count, each kernel's time and the ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_linear_bench_writes_a_row_per_row_count(tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "bench" / "linear.py")),
            *("--model", str(tmp_path / "absent"), "--rows", "1,8", "--repeats", "3"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 8]
    for r in rows:
        assert r["f_linear_ms"] > 0 and r["onednn_ms"] > 0
        if r["packed_ms"] is not None:  # None where this CPU packs nothing
            assert r["speedup_packed"] == r["f_linear_ms"] / r["packed_ms"]
    assert "F.linear/packed" in proc.stdout

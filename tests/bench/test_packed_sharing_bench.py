"""bench/packed_sharing.py runs end to end on SmolLM2 (one round, one later worker per
mode) and shows what it is there to show: a later worker of a sharing pool maps the first
one's packed matrices and holds far less private memory than one that packs its own, and
so does the first worker, once it runs on the copy it stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_packed_sharing_bench_writes_its_json(
    tmp_path: Path, ember_test_home: Path, smollm2_dir: Path
) -> None:
    out = tmp_path / "sharing.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "packed_sharing.py"), "--rounds", "1",
         "--workers", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EMBER_HOME": str(ember_test_home)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("bind_s", "first_request_s", "to_packed_s", "private_mib"):
        assert result[f"{key}_private"] > 0 and result[f"{key}_shared"] > 0, key
    if "sharing did not apply" in proc.stdout:
        pytest.skip("packed matrices cannot be shared with this torch build and CPU")
    # SmolLM2's packed copy is ~260 MiB: a worker that maps it holds at least 150 less.
    assert result["private_mib_private"] - result["private_mib_shared"] > 150, proc.stdout
    first = result["first_private_mib_private"] - result["first_private_mib_shared"]
    assert first > 150, proc.stdout

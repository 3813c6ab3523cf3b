"""bench/engine.py runs end to end and writes the keys its README promises (Ember only,
--quick: the peers are measured by hand, each run takes minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_engine_bench_quick_writes_its_json(
    tmp_path: Path, ember_test_home: Path, smollm2_dir: Path
) -> None:
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "engine.py"),
            "--quick",
            "--peers",
            "",
            "--model",
            str(smollm2_dir),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EMBER_HOME": str(ember_test_home)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in (
        "prefill512_tok_s",
        "decode_b1_tok_s",
        "concurrent8_tok_s",
        "concurrent32_tok_s",
        "mem_read_gbps",
        "decode_b1_frac_of_limit",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert 0 < result["decode_b1_frac_of_limit"] < 1.5
    assert result["decode_b1_ratio_vllm"] is None  # no peers in this run
    assert "Ember" in proc.stdout

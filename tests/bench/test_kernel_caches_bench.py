"""bench/kernel_caches.py runs both sides in their own processes and writes each phase's
memory growth and step time."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_caches_bench_writes_both_sides(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "kernel_caches.json"
    model = tiny_model("llama", torch.bfloat16)
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "bench" / "kernel_caches.py")),
            *("--model", str(model), "--lengths", "4", "--decode", "6", "--threads", "1"),
            *("--rounds", "1"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for mode in ("ember", "torch defaults"):
        assert result[mode]["prefill_step_ms"] > 0 and result[mode]["decode_step_ms"] > 0
        assert {"prefill_growth_mib", "decode_growth_mib"} <= set(result[mode])
    assert "torch defaults" in proc.stdout and "median decode step" in proc.stdout

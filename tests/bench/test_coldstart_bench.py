"""bench/coldstart.py runs end to end (--quick: SmolLM2, one round) and writes the keys the
issue and bench/README.md promise; vLLM, a bench-only install, is recorded as missing
instead of stopping the bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_coldstart_bench_quick_writes_its_json(
    tmp_path: Path, ember_test_home: Path, smollm2_dir: Path
) -> None:
    out = tmp_path / "coldstart.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "coldstart.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "EMBER_HOME": str(ember_test_home)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # Every timing assertion below prints the bench's table: one round is noisy, and a
    # failure should say which figure moved.
    table = proc.stdout[-3000:]
    for state in ("object", "disk", "host", "prewarmed", "ready"):
        assert result[f"ttft_s_{state}"] > 0, state
        assert result[f"speedup_{state}"] > 0, state
        assert set(result[f"phases_{state}"]) >= {"spawn", "imports", "fetch", "first_token"}
    for state in ("object", "disk", "host", "prewarmed"):
        # One round: each phase is that start's own, and they do not overlap (spawn ends
        # where the worker's imports begin), so they add up to no more than the whole,
        # give or take a few clock reads in two processes (before, spawn counted ~25 ms
        # of a new interpreter's imports twice).
        phases = result[f"phases_{state}"]
        assert sum(phases.values()) <= result[f"ttft_s_{state}"] + 0.005, (state, phases, table)
    assert result["ttft_s_transformers"] > 0
    assert "ttft_s_vllm" in result and "speedup_vllm_disk" in result
    assert result["skipped_states"] == {}  # SmolLM2's tiers fit any machine that runs CI
    # The first worker left its packed matrices (and bound weights, where binding
    # converts) for the rest, so the states after it measure what a pool's later workers do.
    assert result["notes"] == [], table
    # The floor under every new-interpreter state: importing torch as they all do, with
    # the modules a new worker defers; all of torch is more.
    floor_s = result["import_torch_deferred_s"]
    assert 0 < floor_s < min(result[f"ttft_s_{s}"] for s in ("disk", "host")), table
    assert result["import_torch_s"] > 0
    assert result["speedup_ceiling_new_interpreter"] > result["speedup_host"], table
    # Where the weights came from is what each state claims.
    assert result["tiers"]["object"] == "s3" and result["tiers"]["host"] == "host"
    assert result["tiers"]["prewarmed"] == "host" and result["tiers"]["disk"] == "disk"
    # A READY worker answers before any cold start does.
    assert result["ttft_s_ready"] < min(result[f"ttft_s_{s}"] for s in ("disk", "host")), table
    # It reuses the chat preamble (SmolLM2's 23 tokens: a block and a copied tail) and
    # nothing else: each request is a new tenant's. With the prefix cache off it prefills
    # all of the prompt.
    assert result["cached_tokens_ready"] == 23 and result["prompt_tokens"] == 37, table
    assert result["ttft_s_ready_no_prefix_cache"] > 0
    assert "ready, no prefix cache" in proc.stdout


@pytest.mark.slow
def test_coldstart_bench_measures_only_the_states_asked_for(
    tmp_path: Path, ember_test_home: Path, smollm2_dir: Path
) -> None:
    out = tmp_path / "prewarmed.json"
    run = [sys.executable, str(ROOT / "bench" / "coldstart.py"), "--json", str(out)]
    env = {**os.environ, "EMBER_HOME": str(ember_test_home)}
    bad = subprocess.run([*run, "--states", "prewarmed,lukewarm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "lukewarm" in bad.stderr
    args = ["--quick", "--no-peers", "--states", "prewarmed", "--rounds", "2"]
    proc = subprocess.run([*run, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["states"] == ["prewarmed"] and result["ttft_s_prewarmed"] > 0
    assert "ttft_s_disk" not in result and result["speedup_vllm_disk"] is None

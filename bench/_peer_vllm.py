"""Peer for bench/engine.py: vLLM's CPU backend on the same inputs.

Runs under ``.venv-peers/bin/python`` (built by ``bench/setup_peers.sh``) because
vLLM pins its own dependency set. Usage: ``python bench/_peer_vllm.py SPEC.json``;
prints one JSON line last. The spec format is described in _peer_transformers.py.

vLLM's CPU worker binds its OpenMP threads to ``VLLM_CPU_OMP_THREADS_BIND`` and
ignores ``torch.set_num_threads``, so threads are set through the environment
before vLLM is imported (an already-set variable wins, for experiments).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _bind_threads(threads: int) -> None:
    """Sets vLLM's CPU environment; it must happen before vllm (and torch) import."""
    # vLLM's "auto" binding keeps one core free for its engine-core process, which on
    # a 2-core machine leaves a single compute thread; binding the cores explicitly
    # makes it compute on the same threads as the other systems.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # 1 GiB holds far more KV than these workloads use and leaves RAM to the other
    # jobs on a shared machine; the KV size does not change the timings.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    _bind_threads(spec["threads"])
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    import_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm = LLM(
        model=spec["model_dir"],
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=2048,
        # The CPU backend reads this as a share of host RAM and refuses the 0.92
        # default on this machine; the KV size actually used comes from
        # VLLM_CPU_KVCACHE_SPACE when engine.py sets it.
        gpu_memory_utilization=0.3,
        seed=spec["seed"],
    )
    startup_s = time.perf_counter() - t1

    times: dict[str, list[float]] = {}
    for wl in spec["workloads"]:
        walls: list[float] = []
        for run in wl["runs"]:
            n = run["max_tokens"]
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            prompts: list[Any] = [{"prompt_token_ids": p} for p in run["prompts"]]
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            got = [len(o.outputs[0].token_ids) for o in outs]
            if got != [n] * len(prompts):
                raise RuntimeError(f"{wl['name']}: generated {got}, expected {n} each")
            if not run.get("warmup"):
                walls.append(wall)
        times[wl["name"]] = walls
        print(f"[vllm] {wl['name']}: {[round(w, 3) for w in walls]}", file=sys.stderr)

    result = {
        "system": "vllm",
        "version": vllm.__version__,
        "dtype": "bfloat16",
        "import_s": import_s,
        "startup_s": startup_s,
        "env": {
            k: os.environ.get(k)
            for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE")
        },
        "times": times,
        "skipped": {},
    }
    print(json.dumps(result), flush=True)
    # The engine-core and worker processes otherwise linger until interpreter exit;
    # stopping them here means engine.py gets its cores back as soon as we return.
    llm.llm_engine.engine_core.shutdown()


# vLLM's CPU executor spawns worker processes that re-import this module: the guard
# keeps them from starting a second engine.
if __name__ == "__main__":
    main()

"""Peers and the floor for bench/coldstart.py, each a fresh process timed to its first token.

- transformers: ``AutoModelForCausalLM.from_pretrained`` from local disk, one token;
- vLLM's CPU build (``.venv-peers``, from ``bench/setup_peers.sh``; ``enforce_eager=True``);
- ``import torch`` alone, collector off as in a worker: the floor of any new interpreter
  that imports all of torch, as the transformers peer does; and the same with the modules
  a new worker defers (``ember_functions.deferred_imports``): the floor of ours.

Each child prints ``FIRST_TOKEN`` when done; the time is from its start to that line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def transformers_ttft(model_dir: Path, threads: int) -> float:
    """A fresh interpreter: import transformers, from_pretrained, one generated token."""
    code = f"""
import torch
torch.set_num_threads({threads})
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, torch_dtype=torch.float32)
enc = tok.apply_chat_template(
    {PROMPT!r}, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
with torch.inference_mode():
    model.generate(**enc, max_new_tokens=1, do_sample=False)
print("FIRST_TOKEN", flush=True)
"""
    return _time_to_marker([sys.executable, "-c", code])


def import_torch_s(threads: int, *, deferred: bool = False) -> float:
    """A fresh interpreter that imports torch and stops: the floor under the three
    new-interpreter states, which import it too (as the transformers peer does). With
    the cyclic collector off while it imports, as a worker imports (0.2-0.3 s less here
    than a plain ``import torch``). ``deferred``: with the modules a new worker defers
    until idle, as it imports them, so that the floor is one our workers cannot beat."""
    defer = (
        "from ember_functions.deferred_imports import DeferredImports\n"
        "deferred = DeferredImports()\ndeferred.start()\n"
    )
    code = (
        f"import gc\ngc.disable()\n{defer if deferred else ''}import torch\n"
        f"{'deferred.stop()' if deferred else ''}\n"
        f"torch.set_num_threads({threads})\nprint('FIRST_TOKEN', flush=True)"
    )
    return _time_to_marker([sys.executable, "-c", code])


def vllm_ttft(model_dir: Path, threads: int) -> float | str:
    python = ROOT / ".venv-peers" / "bin" / "python"
    if not python.exists():
        return "not installed: run bash bench/setup_peers.sh"
    code = f"""
from vllm import LLM, SamplingParams
llm = LLM(model={str(model_dir)!r}, enforce_eager=True, dtype="float32")
llm.chat({PROMPT!r}, SamplingParams(max_tokens=1, temperature=0))
print("FIRST_TOKEN", flush=True)
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    try:
        return _time_to_marker([str(python), "-c", code], env=env)
    except RuntimeError as exc:
        return f"failed: {exc}"


def _time_to_marker(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    if proc.stdout is None:
        raise RuntimeError("no stdout pipe")
    for line in proc.stdout:
        if line.startswith("FIRST_TOKEN"):
            elapsed = time.perf_counter() - t0
            proc.wait()
            return elapsed
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    raise RuntimeError(f"exited {proc.returncode} before the first token: {err[-600:]}")

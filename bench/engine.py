"""Engine throughput: Ember against transformers and vLLM on the same weights, same run.

    python bench/engine.py --json /tmp/engine_bench.json [--quick]

Every system gets the same prompts (random token ids from a fixed seed), generates
exactly the same number of tokens (EOS ignored), on the same 2 threads. Each peer
runs in its own process so its imports and memory stay out of the others' numbers;
vLLM runs under ``.venv-peers`` (``bash bench/setup_peers.sh``). bench/README.md
says what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # _memory_bandwidth is a sibling script, not a package

from _engine_report import Result, print_table, report  # noqa: E402
from _memory_bandwidth import (  # noqa: E402
    machine_busy_s,
    machine_info,
    measure_read_gbps,
    own_cpu_s,
    wait_for_quiet,
)

from ember_functions.engine import LLMEngine  # noqa: E402
from ember_functions.engine_config import EngineConfig  # noqa: E402
from ember_functions.sampling_params import SamplingParams  # noqa: E402
from ember_weights_store import ModelCatalog  # noqa: E402

PEERS_PYTHON = BENCH.parent / ".venv-peers" / "bin" / "python"
THREADS = 2
SEED = 1234
TOKEN_RANGE = (100, 40000)  # plain vocabulary ids: no special or control tokens


@dataclass(frozen=True)
class Sizes:
    prefill_len: int
    prompt_len: int
    gen_tokens: int
    concurrency: tuple[int, ...]
    repeats: int  # timed runs per workload, after one warm-up run
    repeats_c32: int  # the 32-way runs are the slowest; fewer keeps the bench near 12 min
    # Warm-up runs keep the batch and prompt shapes but stop after a few tokens: they
    # exist to touch every kernel and allocation once, not to be timed.
    warmup_tokens: int = 8
    # transformers runs bf16 without hardware support here: a workload whose single
    # run would take longer than this is skipped (null), and repeats stop before
    # their sum passes it, rather than stretching the bench.
    transformers_budget_s: float = 100.0


FULL = Sizes(512, 32, 128, (8, 32), repeats=3, repeats_c32=2)
QUICK = Sizes(64, 16, 8, (8, 32), repeats=1, repeats_c32=1, warmup_tokens=2)


def build_workloads(sizes: Sizes) -> list[dict[str, Any]]:
    """Every run gets fresh prompts so no system can answer from a prefix cache."""
    rng = random.Random(SEED)
    shapes = [
        ("prefill512", 1, sizes.prefill_len, 1),
        ("ttft32", 1, sizes.prompt_len, 1),
        ("decode_b1", 1, sizes.prompt_len, sizes.gen_tokens),
        *((f"concurrent{c}", c, sizes.prompt_len, sizes.gen_tokens) for c in sizes.concurrency),
    ]
    workloads = []
    for name, batch, plen, max_tokens in shapes:
        repeats = sizes.repeats_c32 if batch >= 32 else sizes.repeats
        runs = [
            {
                "prompts": [
                    [rng.randrange(*TOKEN_RANGE) for _ in range(plen)] for _ in range(batch)
                ],
                "max_tokens": min(max_tokens, sizes.warmup_tokens) if i == 0 else max_tokens,
                "warmup": i == 0,
            }
            for i in range(1 + repeats)
        ]
        workloads.append({"name": name, "batch": batch, "prompt_len": plen, "runs": runs})
    return workloads


# -- Ember, in this process ------------------------------------------------------------


def run_ember(model_dir: Path, workloads: list[dict[str, Any]], prefill_len: int) -> Result:
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    # One chunk for the prefill prompt, so that figure is one forward pass as for the peers.
    config = EngineConfig(num_threads=THREADS, max_num_batched_tokens=max(512, prefill_len))
    eng = LLMEngine.from_dir(model_dir, config=config)
    # A serving worker packs its matrices while idle after it is READY; packing them
    # here, inside the load time, is what a script using the engine directly pays.
    eng.packing.pack()
    load_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {}
    step_ttft: list[float] = []
    step_decode: list[float] = []
    for wl in workloads:
        times[wl["name"]] = []
        for run in wl["runs"]:
            n = run["max_tokens"]
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            if wl["name"] == "decode_b1":
                wall, ttft, decode_s = _timed_single(eng, run["prompts"][0], params)
                if not run["warmup"]:
                    step_ttft.append(ttft)
                    step_decode.append(decode_s)
            else:
                start = time.perf_counter()
                outs = eng.generate(run["prompts"], params)
                wall = time.perf_counter() - start
                if any(len(o.token_ids) != n for o in outs):
                    raise RuntimeError(f"ember {wl['name']}: a request did not generate {n} tokens")
            if not run["warmup"]:
                times[wl["name"]].append(wall)
        print(f"  [ember] {wl['name']}: {[round(w, 3) for w in times[wl['name']]]}", flush=True)
    model = eng.model
    # What one decode step streams: every matrix except the embedding table, which is
    # only gathered a row per token, unless it is tied and doubles as the LM head.
    read = [p for n, p in model.named_parameters() if n != "embed"]
    if getattr(model, "lm_head", None) is None:
        read.append(model.embed)
    params_bytes = sum(p.numel() * p.element_size() for p in read)
    # A model that keeps low-precision copies for single-sequence decode streams those
    # instead of its parameters, and says how many bytes that is.
    gemv = getattr(model, "head_gemv", None)
    counted = getattr(model, "decode_bytes_per_token", None)
    result = {
        "system": "ember",
        "dtype": str(model.dtype).removeprefix("torch."),
        "gemv_dtype": str(gemv.dtype).removeprefix("torch.") if gemv is not None else None,
        "load_s": load_s,
        "times": times,
        "step_ttft_s": step_ttft,
        "step_decode_s": step_decode,
        "params_read_per_step": sum(p.numel() for p in read),
        "bytes_read_per_step": counted() if callable(counted) else params_bytes,
        "param_bytes_per_step": params_bytes,
        "skipped": {},
    }
    del eng, model, read, gemv, counted
    gc.collect()
    return result


def _timed_single(
    eng: LLMEngine, prompt: list[int], params: SamplingParams
) -> tuple[float, float, float]:
    """(wall, time to first token, first to last token) from step() timestamps."""
    start = time.perf_counter()
    rid = eng.add_request(prompt, params)
    first: float | None = None
    count = 0
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == rid and out.token_ids:
                count += len(out.token_ids)
                first = first if first is not None else time.perf_counter()
    end = time.perf_counter()
    if first is None or count != params.max_tokens:
        raise RuntimeError(f"ember decode_b1 generated {count} tokens, not {params.max_tokens}")
    return end - start, first - start, end - first


# -- peers, each in its own process ----------------------------------------------------


def run_peer(name: str, python: Path, spec_path: Path, log: Path) -> Result | None:
    # The peers set their own threads from the spec; vLLM's binding is in _peer_vllm.py.
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    print(f"running {name} (log: {log}) ...", flush=True)
    cmd = [str(python), str(BENCH / f"_peer_{name}.py"), str(spec_path)]
    try:
        with log.open("w") as err:
            # A wedged peer must not hold the shared machine: it gets twice a full run.
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=1200
            )
    except subprocess.TimeoutExpired:
        print(f"{name} timed out after 1200 s; recording null (log: {log})")
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        print(f"{name} failed (exit {proc.returncode}); recording null. Log tail:\n{tail}")
        return None
    for line in log.read_text().splitlines():
        if line.startswith(f"[{name}]"):
            print(f"  {line}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: smoke run")
    parser.add_argument("--model", default="smollm2-135m", help="catalog name or model directory")
    parser.add_argument("--peers", default="transformers,vllm", help="comma-separated; '' = none")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    peers = [p for p in args.peers.split(",") if p]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = Path(args.model) if Path(args.model).is_dir() else ModelCatalog().add(args.model)
    workloads = build_workloads(sizes)
    notes: list[str] = []
    info: Result = {"machine": machine_info(THREADS), "model": model_dir.name, "notes": notes}
    # Cores' worth of CPU used by other processes while each system ran: what the
    # machine spent minus what we and our children spent. Near 0 means a clean run.
    others: dict[str, float] = {}
    info["others_cores"] = others

    def measured(name: str, fn: Callable[[], Result | None]) -> Result | None:
        wait_for_quiet(name)
        b0, o0, t0 = machine_busy_s(), own_cpu_s(), time.perf_counter()
        res = fn()
        wall = time.perf_counter() - t0
        others[name] = round(max(0.0, machine_busy_s() - b0 - (own_cpu_s() - o0)) / wall, 3)
        return res

    print("measuring memory read bandwidth ...", flush=True)
    gbps = [measure_read_gbps(threads=THREADS)]
    print("running ember ...", flush=True)
    ours = measured("ember", lambda: run_ember(model_dir, workloads, sizes.prefill_len))
    assert ours is not None
    results: dict[str, Result | None] = {"ember": ours}
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec = {"model_dir": str(model_dir), "threads": THREADS, "seed": SEED}
        spec.update(workloads=workloads, transformers_budget_s=sizes.transformers_budget_s)
        spec_path.write_text(json.dumps(spec))
        for peer in ("transformers", "vllm"):
            results[peer] = None
            python = Path(sys.executable) if peer == "transformers" else PEERS_PYTHON
            if peer not in peers:
                notes.append(f"{peer} not run (--peers)")
                continue
            if not python.exists():
                msg = f"vLLM skipped: {PEERS_PYTHON} is missing; run `bash bench/setup_peers.sh`"
                print(msg)
                notes.append(msg)
                continue
            # The log sits next to the JSON so a failed or odd peer run can be read later.
            log = args.json.resolve().with_suffix(f".{peer}.log")
            res = measured(peer, partial(run_peer, peer, python, spec_path, log))
            results[peer] = res
            if res is None:
                notes.append(f"{peer} failed; see {log}")
                continue
            notes.extend(f"{peer} {wl} skipped (null): {why}" for wl, why in res["skipped"].items())
            for wl in workloads:
                got = len(res["times"].get(wl["name"]) or [])
                if 0 < got < len(wl["runs"]) - 1:
                    notes.append(f"{peer} {wl['name']}: {got} timed run(s), cut to fit the budget")
    # Bandwidth again at the end: neighbours on a shared host move it, and the best of
    # both passes is the closer estimate of what the hardware can stream.
    gbps.append(measure_read_gbps(threads=THREADS))
    info["mem_read_gbps"], info["mem_read_gbps_samples"] = max(gbps), gbps
    noisy = {s: b for s, b in others.items() if b > 0.1}
    if noisy:
        notes.append(f"other jobs used CPU during these systems' runs (cores' worth): {noisy}")
    if results.get("vllm"):
        env = results["vllm"]["env"]  # type: ignore[index]
        notes.append(f"vLLM threads: {env}; its engine-core and front-end share those cores")
    notes.append(
        "peer decode tok/s = (gen-1) / (full-run wall - median max_tokens=1 wall); Ember's from"
        " step() timestamps (its figure by the peers' method is decode_b1_tok_s_subtract_method)"
    )
    out = report(results, sizes, info)
    out["sizes"] = {**asdict(sizes), "seed": SEED, "token_range": list(TOKEN_RANGE)}
    out["runtime_s"] = time.perf_counter() - started
    out["quick"] = args.quick
    print_table(out, sizes)
    print(f"\nruntime {out['runtime_s']:.0f} s; wrote {args.json}")
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

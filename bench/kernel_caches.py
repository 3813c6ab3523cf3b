"""A worker's memory over its life: what new prompt lengths and long generations leave
behind in the matmul kernel caches, with Ember's bounds against torch's defaults.

    python bench/kernel_caches.py [--model smollm2-135m] [--lengths 128] [--decode 300]
        [--threads 2] [--rounds 3] [--json FILE]

Each side runs in a new process (the caches start empty; their sizes are read once), with
the model packed as a READY worker's is, the prefix cache off so every prompt is computed:

- ``ember``: ``kernel_caches.bound_kernel_caches()`` (128 primitives per cache) and decode
  attention's value product in float32 (``attention._decode_attention_cpu``);
- ``torch defaults``: 1024 primitives per cache, and the value product in the cache dtype
  (bf16), as the engine computed it before: a oneDNN matmul built per context length.

Phase one sends ``--lengths`` one-token requests, each prompt one token longer than the
last (a new row count for every projection); phase two generates ``--decode`` tokens from
one prompt (a new context length every step). Reported: RSS growth over each phase
(MiB, from /proc/self/statm) and the median step time (ms), each the median of
``--rounds`` runs per side, interleaved. Ratio = defaults / ember.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("ember", "torch defaults")


def _bf16_value_product(q: Any, k: Any, v: Any, mask: Any, *, scale: float) -> Any:
    """Decode attention as the engine computed it before: the softmax weights back in
    the cache dtype for the value product (a oneDNN matmul in bf16)."""
    import torch

    n, num_heads, head_dim = q.shape
    num_kv_heads, _, context, _ = k.shape
    group = num_heads // num_kv_heads
    batches = num_kv_heads * n
    qg = q.view(n, num_kv_heads, group, head_dim).transpose(0, 1)
    qg = qg.reshape(batches, group, head_dim).float()
    kf = k.reshape(batches, context, head_dim).float()
    scores = torch.bmm(qg, kf.transpose(1, 2)).mul_(scale)
    if mask is not None:
        scores.view(num_kv_heads, n, group, context).masked_fill_(
            ~mask.view(1, n, 1, context), float("-inf")
        )
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    o = torch.bmm(weights, v.reshape(batches, context, head_dim))
    return o.view(num_kv_heads, n, group, head_dim).transpose(0, 1).reshape(n, num_heads, head_dim)


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


def child(mode: str, model: str, lengths: int, decode: int, threads: int) -> dict[str, float]:
    """One side of the comparison, in this (new) process."""
    if mode == "ember":
        from ember_functions.kernel_caches import bound_kernel_caches

        bound_kernel_caches()
    else:
        for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
            os.environ.pop(name, None)
    from ember_functions import attention
    from ember_functions.engine_config import EngineConfig
    from ember_functions.loading import load_engine
    from ember_functions.sampling_params import SamplingParams
    from ember_weights_store import ModelCatalog

    if mode != "ember":
        attention._decode_attention_cpu = _bf16_value_product  # type: ignore[assignment]
    config = EngineConfig(num_threads=threads, kv_cache_bytes=256 << 20, prefix_cache=False)
    engine = load_engine(ModelCatalog(), model, config, err=sys.stderr)
    engine.packing.pack()

    def steps(prompt: list[int], max_tokens: int) -> list[float]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.enqueue(engine.make_request(prompt, params))
        times = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        return times

    vocab = engine.model.config.vocab_size

    def prompt(n: int, seed: int) -> list[int]:
        return [(seed + 7 * i) % vocab for i in range(n)]

    steps(prompt(40, 1000), 2)  # warm-up: first use of every kernel
    rss0 = _rss_mib()
    prefill = [steps(prompt(n, 1000), 1)[0] for n in range(8, 8 + lengths)]
    rss1 = _rss_mib()
    decodes = steps(prompt(30, 2000), decode)[1:]  # the first step is the prefill
    rss2 = _rss_mib()
    return {
        "prefill_growth_mib": rss1 - rss0,
        "prefill_step_ms": statistics.median(prefill) * 1e3,
        "decode_growth_mib": rss2 - rss1,
        "decode_step_ms": statistics.median(decodes) * 1e3,
    }


def run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model]
    cmd += ["--lengths", str(args.lengths), "--decode", str(args.decode)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, default=128, help="prompts of distinct lengths")
    ap.add_argument("--decode", type=int, default=300, help="tokens of one generation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.lengths, args.decode, args.threads)))
        return
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for i in range(args.rounds):  # interleaved: both sides see the same noisy minutes
        for mode in MODES:
            runs[mode].append(run(mode, args))
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    results = {
        mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for mode, rs in runs.items()
    }
    rows = [
        (f"RSS growth, {args.lengths} new prompt lengths (MiB)", "prefill_growth_mib"),
        ("  median prefill step (ms)", "prefill_step_ms"),
        (f"RSS growth, one {args.decode}-token generation (MiB)", "decode_growth_mib"),
        ("  median decode step (ms)", "decode_step_ms"),
    ]
    print(f"\n{args.model}, packed, {args.threads} threads, medians of {args.rounds} runs")
    print(f"{'':52}{'ember':>10}{'torch defaults':>16}{'ratio':>8}")
    for label, key in rows:
        ours, peer = results["ember"][key], results["torch defaults"][key]
        ratio = f"{peer / ours:.2f}" if ours > 0.5 else "-"
        print(f"{label:52}{ours:>10.1f}{peer:>16.1f}{ratio:>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, **results}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Peer for bench/engine.py: Hugging Face transformers ``generate`` on the same inputs.

Runs in its own process so its imports and memory stay out of Ember's measurements.
Usage: ``python bench/_peer_transformers.py SPEC.json``; prints one JSON line last.

The spec (written by engine.py) names the model, the thread count and a list of
workloads; each workload is a list of runs, every run a list of prompts (token ids)
and a ``max_tokens``. Runs flagged ``warmup`` are executed but not timed into the
result. Each prompt set is distinct, so no system can reuse a cached prefix.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _batch(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Left padding keeps every row's last prompt token in the last column, which is
    # where generate() takes its next-token logits from.
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def _generate(model: Any, prompts: list[list[int]], n: int, pad_id: int, name: str) -> float:
    ids, mask = _batch(prompts, pad_id)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            # min_new_tokens masks EOS until n tokens exist: ignore_eos by another name.
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id,
        )
    wall = time.perf_counter() - start
    if out.shape[1] - ids.shape[1] != n:
        raise RuntimeError(f"{name}: generated {out.shape[1] - ids.shape[1]} tokens, not {n}")
    return wall


def _estimate(
    warm: tuple[float, int], n: int, prompt_tokens: int, prefill_tok_s: float | None
) -> float:
    """Seconds one run of ``n`` tokens should take, from its short warm-up run.

    The warm-up's prefill is as long as the real run's, so only its decode steps
    scale with ``n``; the prefill share comes from the measured prefill rate.
    """
    wall, warm_n = warm
    if not prefill_tok_s or warm_n < 2:
        return wall * n / warm_n  # no split known: proportional, which overestimates
    prefill = min(wall, prompt_tokens / prefill_tok_s)
    return prefill + (wall - prefill) / (warm_n - 1) * (n - 1)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16)
    model.eval()
    load_s = time.perf_counter() - t0
    gen_cfg = model.generation_config
    pad_id = gen_cfg.pad_token_id
    if pad_id is None:
        eos = gen_cfg.eos_token_id
        pad_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    budget = spec.get("transformers_budget_s")
    times: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    prefill_tok_s: float | None = None
    for wl in spec["workloads"]:
        name = wl["name"]
        walls: list[float] = []
        warm: tuple[float, int] | None = None
        for run in wl["runs"]:
            n = run["max_tokens"]
            if budget is not None and not run.get("warmup") and warm is not None and not walls:
                estimate = _estimate(warm, n, wl["batch"] * wl["prompt_len"], prefill_tok_s)
                if estimate > budget:
                    skipped[name] = f"one run estimated at {estimate:.0f} s > {budget:.0f} s budget"
                    break
            wall = _generate(model, run["prompts"], n, pad_id, name)
            if run.get("warmup"):
                warm = (wall, n)
                continue
            walls.append(wall)
            if budget is not None and sum(walls) + wall > budget:
                break  # another repeat would overrun: keep the ones measured
        if name in skipped:
            continue
        times[name] = walls
        if name == "prefill512" and walls:
            prefill_tok_s = wl["prompt_len"] / statistics.median(walls)
        print(f"[transformers] {name}: {[round(w, 3) for w in walls]}", file=sys.stderr)

    result: dict[str, Any] = {
        "system": "transformers",
        "version": transformers.__version__,
        "torch": torch.__version__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "times": times,
        "skipped": skipped,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

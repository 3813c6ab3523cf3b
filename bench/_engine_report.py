"""bench/engine.py's figures and table: throughputs (medians) from each system's wall
times, their ratios, the bandwidth limit, and the table printed at the end of a run."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine import Sizes

SYSTEMS = ("ember", "transformers", "vllm")
Result = dict[str, Any]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def figures(res: Result | None, sizes: Sizes) -> Result:
    """Throughputs (medians) from one system's wall times, plus the per-repeat lists."""
    if res is None:
        return {"repeats": None}
    t = res["times"]
    out: Result = {"repeats": {}}
    work = {"prefill512": sizes.prefill_len}
    work.update({f"concurrent{c}": c * sizes.gen_tokens for c in sizes.concurrency})
    for key, tokens in work.items():
        walls = t.get(key) or []
        out["repeats"][key] = [tokens / w for w in walls]
        out[key] = tokens / statistics.median(walls) if walls else None
    decoded = sizes.gen_tokens - 1
    sub = _median(t.get("ttft32") or [])
    if res["system"] == "ember":
        ttfts, decode_s = res["step_ttft_s"], res["step_decode_s"]
        # The peers' method as well, to show the two methods agree on our engine.
        if sub is not None:
            out["decode_b1_subtract"] = decoded / (statistics.median(t["decode_b1"]) - sub)
    else:
        # generate() gives the peers no per-token timestamps: time to first token is
        # the median max_tokens=1 run on a same-length prompt, taken off each full run.
        ttfts = t.get("ttft32") or []
        decode_s = [w - sub for w in t.get("decode_b1") or [] if sub is not None and w > sub]
    out["repeats"]["ttft32"] = ttfts
    out["ttft32"] = _median(ttfts)
    out["repeats"]["decode_b1"] = [decoded / d for d in decode_s]
    out["decode_b1"] = decoded / statistics.median(decode_s) if decode_s else None
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(results: dict[str, Result | None], sizes: Sizes, info: Result) -> Result:
    figs = {s: figures(results.get(s), sizes) for s in SYSTEMS}
    ours = results["ember"]
    assert ours is not None
    out: Result = {}
    for m in ("prefill512", "decode_b1", *(f"concurrent{c}" for c in sizes.concurrency)):
        key = f"{m}_tok_s"
        out[key] = figs["ember"].get(m)
        for peer in ("transformers", "vllm"):
            out[f"{key}_{peer}"] = figs[peer].get(m)
        out[f"{m}_ratio"] = _ratio(out[key], out[f"{key}_transformers"])
        out[f"{m}_ratio_vllm"] = _ratio(out[key], out[f"{key}_vllm"])
    for s in SYSTEMS:
        out["ttft32_s" + ("" if s == "ember" else f"_{s}")] = figs[s].get("ttft32")
    out["decode_b1_tok_s_subtract_method"] = figs["ember"].get("decode_b1_subtract")
    gbps = out["mem_read_gbps"] = info["mem_read_gbps"]
    out["weight_bytes_per_decode_step"] = ours["bytes_read_per_step"]
    out["weight_bytes_per_decode_step_compute_dtype"] = ours["param_bytes_per_step"]
    # tok/s at which a decode step's weight reads would saturate the memory bus; the
    # peers stream the same parameters as bf16, 2 bytes each.
    limits = {"": gbps * 1e9 / ours["bytes_read_per_step"]}
    limits.update(
        dict.fromkeys(("_transformers", "_vllm"), gbps * 1e9 / (2 * ours["params_read_per_step"]))
    )
    for suffix, limit in limits.items():
        rate = out[f"decode_b1_tok_s{suffix}"]
        out[f"decode_b1_frac_of_limit{suffix}"] = rate / limit if rate else None
    out["ember_compute_dtype"] = ours["dtype"]
    out["ember_decode_b1_weights_dtype"] = ours["gemv_dtype"] or ours["dtype"]
    out["weights_dtype"] = "bfloat16"
    out.update({k: info[k] for k in ("machine", "model", "mem_read_gbps_samples", "others_cores")})
    out["repeats"] = {s: figs[s]["repeats"] for s in SYSTEMS}
    out["raw"] = results
    out["notes"] = info["notes"]
    return out


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}{unit}" if abs(x) < 100 else f"{x:.0f}{unit}"


def print_table(out: Result, sizes: Sizes) -> None:
    dtype = out["ember_compute_dtype"]
    how = "fp32 on this CPU (no native bf16)" if dtype == "float32" else dtype
    if out["ember_decode_b1_weights_dtype"] != dtype:
        how += f", b=1 decode streams {out['ember_decode_b1_weights_dtype']} weight copies"
    m = out["machine"]
    print(f"\n{out['model']}: weights bf16; Ember computes {how}; peers run bf16 as specified")
    print(f"{m['cpu']} ({m['cpu_capability']}), {m['threads']} threads, torch {m['torch']}\n")
    rows = [
        (f"prefill {sizes.prefill_len} tok/s", "prefill512_tok_s", "prefill512"),
        (f"TTFT {sizes.prompt_len}-tok prompt, s", "ttft32_s", None),
        (f"decode b=1 tok/s ({sizes.gen_tokens} tok)", "decode_b1_tok_s", "decode_b1"),
        *(
            (f"concurrent {c} tok/s", f"concurrent{c}_tok_s", f"concurrent{c}")
            for c in sizes.concurrency
        ),
    ]
    header = ("metric", "Ember", "transformers", "vLLM", "ratio vs transformers", "ratio vs vLLM")
    table = [header]
    for label, key, m_ in rows:
        cells = [_fmt(out[key]), _fmt(out[f"{key}_transformers"]), _fmt(out[f"{key}_vllm"])]
        ratios = [_fmt(out[f"{m_}_ratio"], "x"), _fmt(out[f"{m_}_ratio_vllm"], "x")] if m_ else []
        table.append((label, *cells, *(ratios or ["", ""])))
    raw = out["raw"]
    starts = [(raw.get(s) or {}).get("startup_s" if s == "vllm" else "load_s") for s in SYSTEMS]
    table.append(("load / startup, s", *(_fmt(x) for x in starts), "", ""))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    pads = [str.ljust] + [str.rjust] * (len(header) - 1)
    for i, r in enumerate(table):
        print(" | ".join(pad(c, w) for pad, c, w in zip(pads, r, widths, strict=True)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print(
        f"\nmemory read {out['mem_read_gbps']:.1f} GB/s; Ember reads "
        f"{out['weight_bytes_per_decode_step'] / 1e6:.0f} MB of weights per b=1 decode step, "
        f"so decode b=1 runs at {out['decode_b1_frac_of_limit']:.0%} of the bandwidth limit"
    )
    for note in out["notes"]:
        print(f"note: {note}")

"""One projection, three kernels: what ``Linear`` picks against what torch code calls.

    python bench/linear.py [--model smollm2-135m] [--dtype auto] [--threads 2]
        [--rows 1,4,8,16,37,64,128,512] [--json FILE]

For each row count, one decoder layer's four matrices (fused qkv, o, fused gate/up,
down: the model's own shapes, random values) are timed with ``F.linear`` on the plain
matrix (the peer: what a torch model calls), oneDNN on the plain matrix, and oneDNN on
the matrix ``Linear.pack`` reordered once. Each cell is the median of ``--repeats``
calls after a warm-up; the table's ratio is F.linear / packed, >1 meaning packing wins.
The row counts cover decoding batches (1-32 sequences) and prefill chunks (37 is the
cold-start benchmark's prompt, 512 the engine's default chunk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _memory_bandwidth import machine_info  # noqa: E402

# SmolLM2-135M's shapes, for when the model is not installed: [out, in] per matrix.
_SMOLLM2 = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """The [out, in] shapes of one of ``model``'s layers' matrices, as the engine lays
    them out (``DecoderLayer.matrices``: fused qkv, o, fused gate/up, down)."""
    from ember_functions.config import ModelConfig
    from ember_functions.linear import Linear
    from ember_functions.model import LlamaModel
    from ember_weights_store import ModelCatalog

    try:
        model_dir = Path(model) if Path(model).is_dir() else ModelCatalog().resolve(model)
        config = ModelConfig.from_dir(Path(model_dir))
    except Exception as exc:  # not installed: the default model's shapes still say something
        print(f"{model}: {exc}; using SmolLM2-135M's shapes", file=sys.stderr)
        return dict(_SMOLLM2)
    with torch.device("meta"):  # shapes only: no weights are allocated
        layer = LlamaModel(config, linear=Linear(device=torch.device("cpu"), dtype=torch.float32))
    return {n: (w.shape[0], w.shape[1]) for n, w in layer.decoder_layers[0].matrices().items()}


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    shapes: dict[str, tuple[int, int]], rows: list[int], dtype: torch.dtype, repeats: int
) -> list[dict[str, Any]]:
    """Per row count: ms for the layer's four matrices with each kernel."""
    from ember_functions.linear import Linear, onednn_linear

    lin = Linear(device=torch.device("cpu"), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    mats = {n: torch.randn(shape, generator=gen).to(dtype) for n, shape in shapes.items()}
    packed = {n: lin.pack(w) for n, w in mats.items()} if lin.packs else None
    out = []
    for t in rows:
        ms = {"f_linear_ms": 0.0, "onednn_ms": 0.0, "packed_ms": 0.0}
        for name, w in mats.items():
            x = torch.randn(t, w.shape[1], generator=gen).to(dtype)
            ms["f_linear_ms"] += 1e3 * _median_s(partial(F.linear, x, w), repeats)
            ms["onednn_ms"] += 1e3 * _median_s(partial(onednn_linear, x, w, None), repeats)
            if packed is not None:
                p = packed[name]
                ms["packed_ms"] += 1e3 * _median_s(partial(onednn_linear, x, p, None), repeats)
        row: dict[str, Any] = {"rows": t, **ms}
        if packed is None:  # this CPU or build packs nothing
            row["packed_ms"] = None
        else:
            row["speedup_packed"] = ms["f_linear_ms"] / ms["packed_ms"]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", help="auto: what the engine computes in here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,8,16,37,64,128,512")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ember_functions.weights import resolve_compute_dtype

    dtype = resolve_compute_dtype(
        args.dtype, weights_dtype=torch.bfloat16, device=torch.device("cpu")
    )
    rows = [int(r) for r in args.rows.split(",")]
    table = measure(layer_shapes(args.model), rows, dtype, args.repeats)
    name = str(dtype).removeprefix("torch.")
    print(f"\n{args.model}, {name}, one layer's 4 matrices, ms (median of {args.repeats})")
    print(f"{'rows':>5} {'F.linear':>9} {'oneDNN':>9} {'packed':>9} {'F.linear/packed':>16}")
    for r in table:
        packed = "-" if r["packed_ms"] is None else f"{r['packed_ms']:9.3f}"
        ratio = f"{r['speedup_packed']:16.2f}" if r.get("speedup_packed") else f"{'-':>16}"
        print(f"{r['rows']:5d} {r['f_linear_ms']:9.3f} {r['onednn_ms']:9.3f} {packed:>9} {ratio}")
    if args.json:
        machine = machine_info(args.threads)
        doc = {"model": args.model, "dtype": name, "machine": machine, "rows": table}
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

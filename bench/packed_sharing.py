"""What sharing packed matrices through the host tier buys a pool's later workers.

    python bench/packed_sharing.py [--model smollm2-135m] [--workers 3] [--rounds 2]
        [--json FILE]

A pool's first worker packs its matrices once idle (oneDNN's blocked layout, ``Linear.pack``)
and, with ``share_packing`` on, leaves them in the machine's host tier; every later worker
maps them at bind (``packed_cache``). The peer is the same pool with ``share_packing`` off,
as before: every worker packs a private copy. For each mode, in a fresh host tier, a zygote
forks the first worker, which serves one request and packs; then ``--workers`` more are
forked one after another, each measured:

- ``bind``: its bind phase (sharing maps and wraps the packed matrices here);
- ``first request``: time to the first token of a 37-token chat prompt with a cache salt of
  its own (the whole prompt prefilled), on the matrices it has then: packed when shared,
  unpacked when it must still pack its own;
- ``to packed``: from its fork until it reports its matrices packed (it waits for idleness
  first: ``PACK_AFTER_IDLE_S``, then the preamble, then a layer per idle turn);
- ``private MiB``: its anonymous memory once packed (``/proc/PID/smaps_rollup``): a private
  packed copy is anonymous, mapped host-tier pages are not.

And the first worker's own ``private MiB`` once settled: shared, it has stored its packed
copy and switched to the stored one (``Packing.share_stored``), freeing its own.

Modes alternate per round; medians over rounds and workers. The table's ratio is
private / shared (above 1: sharing wins).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _coldstart_peers import PROMPT  # the cold-start bench's request and its phases
from _coldstart_states import phases_of

MODES = ("private", "shared")


def anonymous_mib(pid: int) -> float:
    from ember_functions.host_memory import read_process_memory

    memory = read_process_memory(pid)
    if memory is None:
        raise RuntimeError(f"no /proc/{pid}/smaps_rollup to read: this bench needs Linux")
    return memory.anonymous_bytes / 2**20


def first_token_s(worker: Any, rid: str) -> float:
    from ember_functions.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    t0 = time.perf_counter()
    request = worker.prepare(PROMPT, params, request_id=rid, cache_salt=f"sharing-{rid}")
    worker.submit_prepared(request).result()
    return time.perf_counter() - t0


def run_mode(
    mode: str, model: str, home: Path, workers: int, threads: int
) -> tuple[list[dict], float]:
    """The later workers' rows, and the first worker's private MiB once settled."""
    from ember_functions.engine_config import EngineConfig
    from ember_functions.launch import Zygote
    from ember_functions.loading import StoreConfig, WeightsSource
    from ember_functions.worker_process import WorkerProcess
    from ember_weights_store import load

    store = StoreConfig(host_cache_bytes=8 << 30)
    root = Path(store.catalog(home).host_cache_root)
    shutil.rmtree(root, ignore_errors=True)  # a fresh host tier: nothing packed in it
    load(store.catalog(home).store(), model).wait_promoted()
    config = EngineConfig(
        num_threads=threads, kv_cache_bytes=64 << 20, share_packing=mode == "shared"
    )
    rows = []
    with Zygote.start(zygote_id=f"ps{os.getpid()}-{mode}") as zygote:

        def spawn(i: int, prompts: Any = None) -> Any:
            return WorkerProcess.spawn(
                worker_id=f"ps{os.getpid()}-{mode}-{i}-{time.monotonic_ns()}",
                model=model,
                home=home,
                engine_config=config,
                store=store,
                launcher=zygote,
                prompts=prompts,
            )

        first = spawn(0)
        live = [first]
        try:
            first_token_s(first, "first")
            if not first.wait_packed(timeout_s=600):
                raise RuntimeError("the first worker never packed")
            zygote.prepare(
                first.prompts.tokenizer.source_dir or Path(),
                weights=WeightsSource(home, model, store),
            )
            # Shared, the first worker switches to its copy once stored: the entry is there.
            deadline = time.monotonic() + 60
            while mode == "shared" and not (first.packed and first.packed.shared):
                if time.monotonic() > deadline:
                    raise RuntimeError("the first worker left no packed matrices, or kept its own")
                time.sleep(0.05)
            first_mib = anonymous_mib(first.proc.pid)
            for i in range(1, workers + 1):
                t0 = time.perf_counter()
                w = spawn(i, first.prompts)
                live.append(w)
                ttft = first_token_s(w, f"w{i}")
                if not w.wait_packed(timeout_s=600):
                    raise RuntimeError(f"worker {i} never packed")
                rows.append(
                    {
                        "bind_s": phases_of(w, ttft)["bind"],
                        "first_request_s": ttft,
                        "to_packed_s": time.perf_counter() - t0,
                        "private_mib": anonymous_mib(w.proc.pid),
                        "shared": bool(w.packed and w.packed.shared),
                    }
                )
        finally:
            for w in live:
                w.close()
            shutil.rmtree(root, ignore_errors=True)
    return rows, first_mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="installed name, alias or directory")
    ap.add_argument("--workers", type=int, default=3, help="later workers measured per mode")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from ember_weights_store import ModelCatalog
    from ember_weights_store.catalog import default_home

    installed = ModelCatalog(default_home()).resolve(args.model)
    name = installed.name if os.sep in args.model else args.model
    with tempfile.TemporaryDirectory(prefix="ember-sharing-") as tmp:
        home = Path(tmp)
        catalog = ModelCatalog(home)
        catalog.store().import_hf_dir(installed, model_id=name)
        catalog.models_dir.mkdir(parents=True, exist_ok=True)
        (catalog.models_dir / name).symlink_to(installed)
        rows: dict[str, list[dict]] = {m: [] for m in MODES}
        firsts: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in MODES:
                later, first_mib = run_mode(mode, name, home, args.workers, args.threads)
                rows[mode] += later
                firsts[mode].append(first_mib)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    if not all(row["shared"] for row in rows["shared"]):
        print("note: sharing did not apply here (no oneDNN packing, or torch cannot wrap it)")
    keys = ("bind_s", "first_request_s", "to_packed_s", "private_mib")
    out: dict[str, Any] = {"model": name, "workers": args.workers, "rounds": args.rounds}
    print(f"\n{name}: later workers of a pool, medians of {args.rounds} x {args.workers}")
    print(f"{'':16}{'private':>10}{'shared':>10}{'ratio':>8}")
    for key in keys:
        private = statistics.median(row[key] for row in rows["private"])
        shared = statistics.median(row[key] for row in rows["shared"])
        out[f"{key}_private"], out[f"{key}_shared"] = private, shared
        unit = 1e3 if key.endswith("_s") and key != "to_packed_s" else 1
        label = {"bind_s": "bind ms", "first_request_s": "first request ms",
                 "to_packed_s": "to packed s", "private_mib": "private MiB"}[key]  # fmt: skip
        ratio = private / shared if shared else float("nan")
        print(f"{label:16}{private * unit:10.1f}{shared * unit:10.1f}{ratio:8.2f}")
    private, shared = (statistics.median(firsts[m]) for m in MODES)
    out["first_private_mib_private"], out["first_private_mib_shared"] = private, shared
    print(f"{'first worker MiB':16}{private:10.1f}{shared:10.1f}{private / shared:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

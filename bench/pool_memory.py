"""The RAM of an `ember serve` pool of N workers: sharing what they derive from the model
(packed matrices) through the host tier, and its chunks through the disk tier's page cache
(the default once a pool can run more than one worker), against each worker on its own.

    python bench/pool_memory.py [--model smollm2-135m] [--workers 2,3] [--rounds 2]
        [--json FILE]

For each pool size and mode, in a fresh host tier, it starts `ember serve --min-warm N
--max-workers N` (the peer: `--host-cache-mib 0`, no host tier, as every pool was before),
waits until every worker has packed its matrices and gone quiet, and reads `/workers`
(after one unmeasured pool, so that the model is in the disk tier every round):

- ``ram MiB``: the pool's RAM, the headline: every page its workers map, once, plus
  what the host tier holds that no worker maps (tmpfs pages stay in RAM mapped or not;
  page-cache pages nobody maps are not counted: the kernel may reclaim them).
- ``pss MiB``: the sum over the workers of their proportional set size, each shared page
  split among the processes mapping it: every page a worker maps, counted once, page
  cache and /dev/shm included.
- ``private MiB``: the sum of their private pages (what stopping them frees at once).
- ``tier MiB``: what the host tier holds in /dev/shm: the packed copy (the chunks stay
  in the disk tier, ``StoreConfig.host_chunks=False``).
- ``boot load s``: the first worker's load phase.
- ``layers packed``: matrices' layers the pool's workers packed themselves (a model's
  layers and its LM head, summed over workers): shared, one worker packs for all while
  the others wait for its copy (the host tier's packing lease); alone, every worker packs.
- ``settle s``: from starting the server until every worker runs packed (shared: on the
  stored copy); until then a worker's matmuls run unpacked, slower.
- ``settle cpu s``: the CPU seconds the workers spent until then (loading, packing,
  storing), and ``settle peak private MiB``: the most private RAM they held at once
  meanwhile (sampled every 0.05 s, and once settled), which a copy packed only to be
  thrown away inflates.
  Private counts every page one process alone maps, file pages too: once a worker hands
  back its mapping of the unpacked matrices (``Packing.release_unpacked``), the same
  pages count as private to the worker that still maps them, until it has packed too.
  ``settle peak anon MiB`` counts pages backed by no file only (heap, KV cache, packed
  copies, and each worker's view of its zygote's heap): the copies packing made.

Then SIGTERM to the server's whole process group, as systemd sends it, and what is left
in /dev/shm. Modes alternate per round; medians over rounds. The ratio is alone / shared
(above 1: sharing wins).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _proc import cpu_s

MODES = {"shared": "auto", "alone": "0"}  # --host-cache-mib of each


def _tier_mib(root: Path) -> float:
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
    return total / 2**20


def _memory_bytes(pid: int, kind: str) -> int:
    """A worker's ``kind`` bytes (a ``ProcessMemory`` field: ``shared_memory_bytes``,
    ``anonymous_bytes``), read from its own smaps; 0 once it is gone."""
    from ember_functions.host_memory import read_process_memory

    memory = read_process_memory(pid)
    return int(getattr(memory, kind)) if memory else 0


def _settled(rows: list[dict[str, Any]], workers: int, *, shared: bool) -> bool:
    """Every worker READY and packed, and with sharing, mapping the stored packed copy:
    of workers started together one packs for all, and all switch to its copy only once
    it is written."""
    ready = [r for r in rows if r["state"] == "READY"]
    done = [
        r
        for r in ready
        if r.get("pack_s") is not None and (r["pack_shared"] or r.get("pack_stopped") or not shared)
    ]
    return len(ready) == len(done) == workers


def run_pool(model: str, home: Path, workers: int, mode: str, threads: int) -> dict[str, float]:
    import httpx

    from ember_platform.serve_process import free_port, start_serve
    from ember_weights_store import ModelCatalog

    root = ModelCatalog(home).host_cache_root
    shutil.rmtree(root, ignore_errors=True)  # a fresh host tier, as after a machine boot
    args = ["--model", model, "--threads", str(threads), "--log-level", "warning"]
    args += ["--min-warm", str(workers), "--max-workers", str(workers)]
    args += ["--host-cache-mib", MODES[mode]]
    t0 = time.perf_counter()
    server = start_serve(home, port=free_port(), args=args, new_session=True)
    group = os.getpgid(server.proc.pid)
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            deadline = time.monotonic() + 300
            shared = mode == "shared"
            peak_private = peak_anon = 0
            while True:
                rows = http.get("/workers").json()["data"]
                # The settled state is a sample too: alone, the last worker to pack reaches
                # its peak, its whole packed copy, just as the pool settles.
                peak_private = max(peak_private, sum(r.get("private_bytes") or 0 for r in rows))
                anon = sum(_memory_bytes(r["pid"], "anonymous_bytes") for r in rows if r.get("pid"))
                peak_anon = max(peak_anon, anon)
                if _settled(rows, workers, shared=shared):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pool never settled: {rows}")
                time.sleep(0.05)
            settle_s = time.perf_counter() - t0
            settle_cpu_s = sum(cpu_s(r["pid"]) or 0.0 for r in rows)
            time.sleep(2.0)  # the last pages freed, the last unmapped
            rows = http.get("/workers").json()["data"]
        boot = min(rows, key=lambda r: r["worker_id"])
        pss_mib = sum(r["proportional_bytes"] for r in rows) / 2**20
        tier_mib = _tier_mib(root)
        # The workers' shared-memory pages, each counted once: the mapped part of the tier.
        mapped_shm_mib = sum(_memory_bytes(r["pid"], "shared_memory_bytes") for r in rows) / 2**20
        out = {
            "ram_mib": pss_mib + max(0.0, tier_mib - mapped_shm_mib),
            "pss_mib": pss_mib,
            "private_mib": sum(r["private_bytes"] for r in rows) / 2**20,
            "tier_mib": tier_mib,
            "boot_load_s": float(boot["cold_start"]["load_s"]),
            "layers_packed": float(sum(r.get("packed_layers", 0) for r in rows)),
            "settle_s": settle_s,
            "settle_cpu_s": settle_cpu_s,
            "settle_peak_private_mib": peak_private / 2**20,
            "settle_peak_anon_mib": peak_anon / 2**20,
        }
    finally:
        os.killpg(group, signal.SIGTERM)
    server.proc.wait(timeout=60)
    out["tier_mib_after_stop"] = _tier_mib(root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workers", default="2,3", help="pool sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="per worker")
    ap.add_argument("--home", default=None, help="default: the usual EMBER_HOME")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from ember_weights_store import ModelCatalog, default_home

    home = Path(args.home) if args.home else default_home()
    ModelCatalog(home).path_for(args.model)  # installed: `ember models add` first
    sizes = [int(n) for n in args.workers.split(",")]
    # Unmeasured: the first pool ever started from a home fetches the chunks into the disk
    # tier and writes the tokenizer cache, so its first round would start unlike the rest
    # (its first worker also kept ~60 MiB of its load threads' heaps, until their scratch
    # left the C heap: ``load_scratch``).
    run_pool(args.model, home, 1, "alone", args.threads)
    runs: dict[str, list[dict[str, float]]] = {}
    for n in sizes:
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                got = run_pool(args.model, home, n, mode, args.threads)
                print(f"[{n} workers, {mode}, round {r + 1}] {got}", flush=True)
                runs.setdefault(f"{n}-{mode}", []).append(got)
    result: dict[str, Any] = {"model": args.model, "rounds": args.rounds, "workers": sizes}
    print(f"\n{args.model}, medians of {args.rounds} (alone / shared: above 1, sharing wins)")
    print(f"{'workers':<8}{'figure':<22}{'shared':>10}{'alone':>10}{'ratio':>8}")
    for n in sizes:
        for key in (
            "ram_mib",
            "pss_mib",
            "private_mib",
            "tier_mib",
            "boot_load_s",
            "layers_packed",
            "settle_s",
            "settle_cpu_s",
            "settle_peak_private_mib",
            "settle_peak_anon_mib",
            "tier_mib_after_stop",
        ):
            shared = statistics.median(x[key] for x in runs[f"{n}-shared"])
            alone = statistics.median(x[key] for x in runs[f"{n}-alone"])
            ratio = f"{alone / shared:.2f}" if shared else "-"
            print(f"{n:<8}{key:<22}{shared:>10.2f}{alone:>10.2f}{ratio:>8}")
            result[f"{key}_shared_{n}"], result[f"{key}_alone_{n}"] = shared, alone
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())

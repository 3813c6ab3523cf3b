"""Weights loading: Ember's store against the loaders people use, and against the hardware.

    bash bench/setup_weights_peers.sh        # runai-model-streamer[s3] into .venv, once
    python bench/weights.py --json /tmp/weights_bench.json [--quick] [--models smollm2,llama-1b]

For each model (SmolLM2-135M, real weights; a ~1.1B random-init Llama built from a seed),
in the same run, on the same files, interleaved round by round so the machine's noise falls
on everyone alike (medians over rounds):

- ours: import into a local bucket (stored size vs the safetensors files), then load from
  the disk tier warm and with its page cache evicted, from the host tier (/dev/shm), and from
  an S3 endpoint (moto's server, in its own process so it does not share our GIL);
- peers: ``safetensors.torch.load_file`` with every tensor touched, transformers
  ``from_pretrained``, runai-model-streamer's ``SafetensorsStreamer`` on the local files and
  on the same S3 endpoint;
- limits: parallel ``pread`` of the safetensors files into a preallocated buffer (warm and
  cold), ``memcpy`` between two buffers, parallel whole-object GETs of our stored chunks.

Our loads reuse the flat buffers of the previous load (a warm worker reloading), as the
pread limit reuses its buffer; ``ours_disk_warm_fresh`` shows the cost of fresh buffers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # sibling scripts, not a package

import _io_limits as io  # noqa: E402
import _random_llama  # noqa: E402
from _io_limits import free_port, start_moto  # noqa: E402

from ember_weights_store import DiskTier, HostTier, LocalBucketTier, ModelCatalog  # noqa: E402
from ember_weights_store.loader import LoadedWeights, load  # noqa: E402
from ember_weights_store.model_copies import copy_model  # noqa: E402
from ember_weights_store.store import WeightsStore  # noqa: E402

MODELS = ("smollm2", "llama-1b")
BIG = 1 << 40  # cache budgets that never evict during the bench
INNER_REPEATS = 5
Row = dict[str, Any]


def model_dir_for(name: str, cache: Path) -> Path:
    if name == "smollm2":
        catalog = ModelCatalog(Path(os.environ.get("EMBER_HOME", Path.home() / ".cache/ember")))
        return catalog.add("smollm2-135m", progress=False)
    return _random_llama.build(cache / "llama-1b-random", seed=0)


class ModelBench:
    """Everything one model needs: its files, tiers, S3 copies, and one timed run of each."""

    def __init__(self, name: str, model_dir: Path, work: Path, s3: Any, *, threads: int) -> None:
        from ember_weights_store.s3_tier import S3Tier

        self.name = name
        self.threads = threads
        self.files = sorted(model_dir.glob("*.safetensors"))
        self.file_bytes = sum(p.stat().st_size for p in self.files)
        self.model_dir = model_dir
        bucket = LocalBucketTier(work / "bucket", fsync=False)
        print(f"[{name}] importing {self.file_bytes / 1e9:.2f} GB ...", flush=True)
        report = WeightsStore([bucket]).import_hf_dir(model_dir, model_id=name, threads=2)
        self.manifest = WeightsStore([bucket]).manifest(name)
        self.raw_bytes = report.raw_bytes
        self.stored_bytes = sum(c.stored_size for c in self.manifest.chunks)
        self.disk = DiskTier(work / "disk", budget_bytes=BIG, fsync=False)
        self.host = HostTier(Path(f"/dev/shm/ember-bench-{os.getpid()}"), budget_bytes=BIG)
        self.disk_store = WeightsStore([self.disk, bucket])
        self.host_store = WeightsStore([self.host, bucket])
        self.s3_client, self.s3_bucket = s3
        s3_tier = S3Tier(bucket=self.s3_bucket, prefix=f"ember/{name}", client=self.s3_client)
        self.s3_store = WeightsStore([s3_tier])
        print(f"[{name}] filling the tiers and the S3 endpoint ...", flush=True)
        load(self.disk_store, name).wait_promoted()
        load(self.host_store, name).wait_promoted()
        copy_model(bucket, s3_tier, name)
        self.chunk_objects = [s3_tier.object_name(c.hash) for c in self.manifest.chunks]
        self.s3_files = []
        for path in self.files:
            key = f"safetensors/{name}/{path.name}"
            self.s3_client.upload_file(str(path), self.s3_bucket, key)
            self.s3_files.append(f"s3://{self.s3_bucket}/{key}")
        self.prev: LoadedWeights = load(self.disk_store, name, promote=False)
        self.scratch = torch.empty(self.file_bytes, dtype=torch.uint8)
        self.scratch.fill_(1)  # fault in: the limit is the medium, not page faults
        self.copy_dst = torch.empty_like(self.scratch)
        self.copy_dst.fill_(1)

    def ours(self, store: WeightsStore, *, evict: bool = False) -> float:
        if evict:
            io.evict_page_cache(io.tree_files(self.disk.root))
        seconds, loaded = io.timed(
            lambda: load(store, self.name, reuse=self.prev, promote=False, threads=self.threads)
        )
        if not loaded.report.mapped:  # mapped buffers are not reused (see loader)
            self.prev = loaded
        return seconds

    def runs(self, *, slow_peers: bool) -> dict[str, Callable[[], float]]:
        files, s = self.files, self

        def cold(fn: Callable[[], Any]) -> float:
            io.evict_page_cache(files)
            return io.timed(fn)[0]

        runs: dict[str, Callable[[], float]] = {
            "pread_cold": lambda: (io.evict_page_cache(files), io.parallel_pread(files, s.scratch))[
                1
            ],
            "pread_warm": lambda: io.parallel_pread(files, s.scratch),
            "memcpy": lambda: io.memcpy_s(s.scratch, s.copy_dst),
            "s3_get": lambda: io.timed(
                lambda: io.s3_parallel_get(s.s3_client, s.s3_bucket, s.chunk_objects)
            )[0],
            "ours_disk_cold": lambda: s.ours(s.disk_store, evict=True),
            "ours_disk_warm": lambda: s.ours(s.disk_store),
            "ours_disk_warm_fresh": lambda: io.timed(
                lambda: load(s.disk_store, s.name, promote=False, threads=s.threads)
            )[0],
            "ours_host": lambda: s.ours(s.host_store),
            "ours_s3": lambda: s.ours(s.s3_store),
            "safetensors_cold": lambda: cold(lambda: io.safetensors_load(files)),
            "safetensors_warm": lambda: io.timed(lambda: io.safetensors_load(files))[0],
            "transformers_warm": lambda: io.timed(lambda: io.transformers_load(s.model_dir))[0],
            "runai_local_cold": lambda: cold(lambda: io.runai_load([str(p) for p in files])),
            "runai_local_warm": lambda: io.timed(lambda: io.runai_load([str(p) for p in files]))[0],
        }
        if slow_peers:
            runs["runai_s3"] = lambda: io.timed(lambda: io.runai_load(s.s3_files))[0]
        return runs

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.host.root, ignore_errors=True)


def measure(bench: ModelBench, rounds: int, slow_rounds: int) -> tuple[dict[str, float], Row]:
    """Seconds per run, the median over rounds; every run of a round goes once, in order.
    A run that fails (a peer that cannot load from this endpoint, say) is recorded with its
    error and not tried again."""
    samples: dict[str, list[float]] = {}
    failures: Row = {}
    for r in range(rounds):
        for name, run in bench.runs(slow_peers=r < slow_rounds).items():
            if name in failures:
                continue
            gc.collect()
            try:
                first = run()
                # Sub-second runs are at the mercy of the machine's neighbours: take the
                # median of a few back to back, so one hiccup does not make the round.
                extra = [run() for _ in range(INNER_REPEATS - 1)] if first < 1.0 else []
                samples.setdefault(name, []).append(statistics.median([first, *extra]))
            except Exception as exc:  # a peer's failure is a result, not a crash of the bench
                failures[name] = f"{type(exc).__name__}: {exc}"
                samples.pop(name, None)
                print(f"[{bench.name}] {name} failed: {failures[name]}", flush=True)
        print(f"[{bench.name}] round {r + 1}/{rounds} done", flush=True)
    return {name: statistics.median(xs) for name, xs in samples.items()}, failures


def figures(b: ModelBench, t: dict[str, float]) -> Row:
    gbps = {k: (b.stored_bytes if k == "s3_get" else b.file_bytes) / v / 1e9 for k, v in t.items()}
    for k in t:
        if k.startswith("ours"):
            gbps[k] = b.raw_bytes / t[k] / 1e9

    def ratio(num: dict[str, float], a: str, den: dict[str, float], c: str) -> float | None:
        return num[a] / den[c] if a in num and c in den else None

    return {
        "file_bytes": b.file_bytes,
        "raw_bytes": b.raw_bytes,
        "stored_bytes": b.stored_bytes,
        "seconds": t,
        "gbps": gbps,
        "stored_ratio": b.stored_bytes / b.file_bytes,
        "warm_load_ratio_vs_safetensors": ratio(t, "safetensors_warm", t, "ours_disk_warm"),
        "warm_load_frac_of_pread": ratio(gbps, "ours_disk_warm", gbps, "pread_warm"),
        "cold_load_frac_of_pread": ratio(gbps, "ours_disk_cold", gbps, "pread_cold"),
        "host_load_frac_of_memcpy": ratio(gbps, "ours_host", gbps, "memcpy"),
        "s3_load_frac_of_get": ratio(t, "s3_get", t, "ours_s3"),
        "s3_load_ratio_vs_runai": ratio(t, "runai_s3", t, "ours_s3"),
        "cold_load_ratio_vs_safetensors": ratio(t, "safetensors_cold", t, "ours_disk_cold"),
        "warm_load_ratio_vs_transformers": ratio(t, "transformers_warm", t, "ours_disk_warm"),
        "warm_load_ratio_vs_runai": ratio(t, "runai_local_warm", t, "ours_disk_warm"),
        "cold_load_ratio_vs_runai": ratio(t, "runai_local_cold", t, "ours_disk_cold"),
        "fresh_vs_reused_buffers": ratio(t, "ours_disk_warm_fresh", t, "ours_disk_warm"),
    }


KEYS = (  # (key, higher is better, target)
    ("stored_ratio_real", False, 0.70),
    ("warm_load_ratio_vs_safetensors", True, 4.0),
    ("warm_load_frac_of_pread", True, 0.7),
    ("cold_load_frac_of_pread", True, 0.85),
    ("host_load_frac_of_memcpy", True, 0.5),
    ("s3_load_frac_of_get", True, 0.8),
    ("s3_load_ratio_vs_runai", True, 1.5),
)


def print_table(per_model: dict[str, Row], summary: Row) -> None:
    names = list(per_model)
    print("\nload time, seconds (GB/s), median over rounds")
    print(f"{'run':24}" + "".join(f"{n:>22}" for n in names))
    runs = list(dict.fromkeys(r for n in names for r in per_model[n]["seconds"]))
    for run in runs:
        cells = []
        for n in names:
            s, g = per_model[n]["seconds"].get(run), per_model[n]["gbps"].get(run)
            cells.append(f"{s:8.3f} ({g:6.2f} GB/s)" if s is not None else f"{'-':>20}")
        print(f"{run:24}" + "".join(f"{c:>22}" for c in cells))
    print("\nratios (ours vs peer or limit)")
    ratio_keys = [k for k, v in per_model[names[0]].items() if isinstance(v, float | None)]
    for n in names:
        for run, why in per_model[n].get("failures", {}).items():
            print(f"  {n}: {run} failed: {why[:160]}")
    for k in ratio_keys:
        vals = [per_model[n].get(k) for n in names]
        print(f"{k:34}" + "".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in vals))
    print("\nsummary (worst over models), target")
    for key, higher, target in KEYS:
        v = summary.get(key)
        ok = v is not None and (v >= target if higher else v <= target)
        shown = f"{v:.3f}" if v is not None else "-"
        print(
            f"{key:34}{shown:>10}  {'>=' if higher else '<='} {target}  {'ok' if ok else 'MISSED'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", type=Path, required=True, help="write the figures here")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slow-rounds", type=int, default=1, help="rounds that run runai from S3")
    ap.add_argument("--threads", type=int, default=8, help="our loader's threads")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, one round")
    args = ap.parse_args()
    models = ["smollm2"] if args.quick else [m for m in args.models.split(",") if m]
    rounds = 1 if args.quick else args.rounds
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    torch.set_num_threads(2)
    port = free_port()
    # runai's S3 backend reads these; boto3 too. moto accepts any credentials.
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
    )
    moto = start_moto(port)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket="bench")
        cache = BENCH.parent / ".cache" / "bench"
        per_model: dict[str, Row] = {}
        for name in models:
            with tempfile.TemporaryDirectory(
                dir=cache.parent if cache.parent.exists() else None
            ) as work:
                b = ModelBench(
                    name,
                    model_dir_for(name, cache),
                    Path(work),
                    (client, "bench"),
                    threads=args.threads,
                )
                try:
                    seconds, failures = measure(b, rounds, args.slow_rounds)
                    per_model[name] = figures(b, seconds)
                    per_model[name]["failures"] = failures
                finally:
                    b.close()
                del b
                gc.collect()
    finally:
        moto.kill()
    summary: Row = {}
    if "smollm2" in per_model:
        summary["stored_ratio_real"] = per_model["smollm2"]["stored_ratio"]
    for key, higher, _ in KEYS[1:]:
        vals = [r[key] for r in per_model.values() if r.get(key) is not None]
        summary[key] = (min(vals) if higher else max(vals)) if vals else None
    out = {
        "summary": summary,
        **summary,
        "models": per_model,
        "rounds": rounds,
        "threads": args.threads,
        "cpus": os.cpu_count(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print_table(per_model, summary)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""bench/coldstart.py's start states: one model's homes and tiers, and one timed cold start
from each state (what each state means: coldstart.py's docstring)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import _io_limits
from _coldstart_peers import PROMPT
from _coldstart_report import PHASES

READY_SAMPLES = 5  # requests to a READY worker per round, their median its figure


def phases_of(worker: Any, first_token_s: float) -> dict[str, float]:
    """A worker's cold start as the table and chart stack it (``PHASES``)."""
    p = worker.phases
    weights = p.get("weights_wall_s", 0.0)
    # Reading the chunks from the disk where the readahead had not finished by the end of
    # the imports: a fetch, though the loader's own report does not count it.
    waited = p.get("readahead_wait_s", 0.0)
    shares = _share(p, weights)
    return {
        "spawn": p.get("spawn_s", 0.0),
        "imports": p.get("imports_s", 0.0),
        "manifest": p.get("manifest_s", 0.0),
        # The loader's fetch and decompress are summed over its threads; scale them to the
        # weights' wall time so the stacked phases add up to what a request waited.
        "fetch": shares["fetch"] + waited,
        "decompress": shares["decompress"],
        "bind": max(0.0, p.get("load_s", 0.0) - weights - waited),
        "first_token": first_token_s,
    }


def _share(p: dict[str, float], wall_s: float) -> dict[str, float]:
    fetch, decompress = p.get("fetch_s", 0.0), p.get("decompress_s", 0.0)
    total = fetch + decompress
    if total <= 0:
        return {"fetch": wall_s, "decompress": 0.0}
    return {"fetch": wall_s * fetch / total, "decompress": wall_s * decompress / total}


# How long the first worker may take to leave its bound weights or packed matrices in the
# host tier once it has them (writing the 1.1B model's 4.4 GB takes seconds).
KEEP_TIMEOUT_S = 120.0


def _appears(root: Path, pattern: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not list(root.glob(pattern)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _first_token(worker: Any, rid: str) -> tuple[float, int]:
    """(seconds, cached prompt tokens) to the first token of PROMPT. Each request gets its
    own cache salt, as a new tenant's would: a READY worker that answered the same prompt
    before reuses no KV of it, only the public chat preamble every tenant shares."""
    from ember_functions.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    t0 = time.perf_counter()
    request = worker.prepare(PROMPT, params, request_id=rid, cache_salt=f"coldstart-{rid}")
    done = worker.submit_prepared(request).result()
    return time.perf_counter() - t0, done.usage.cached_tokens


def _checkpoint_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def _host_tier_bytes(model_dir: Path) -> int:
    """At least 8 GiB, and as much as ``ember serve`` would plan for a pool of this model
    fetched from S3 (5x the checkpoint, at most half of free /dev/shm). Before 2026-12-06
    (fourth session) it was a fixed 8 GiB, too small on a CPU that computes a bf16
    checkpoint in float32 for the 1.1B model's chunks (2.2 GB), converted matrices
    (4.4 GB) and packed copy (4.4 GB): the converted ones were evicted, and every worker
    converted them again."""
    from ember_warmpool.host_sharing import plan_host_sharing, shm_free_bytes

    plan = plan_host_sharing(
        max_workers=4,
        checkpoint_bytes=_checkpoint_bytes(model_dir),
        shm_free_bytes=shm_free_bytes(),
        holds_chunks=True,
    )
    return max(plan.budget_bytes, 8 << 30)


GIB = 1 << 30
MEMORY_MARGIN_BYTES = 2 * GIB  # the bench itself, the zygote, moto, the page cache's churn


def states_that_fit(
    states: tuple[str, ...], *, fill_bytes: int, worker_bytes: int, available_bytes: int
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The states this machine's RAM can measure, and why the others cannot. Every state
    needs the host pool's tier (``fill_bytes``: what a pool leaves in it) and a worker's
    own copy (``worker_bytes``); ``prewarmed_s3``'s pool fills a second tier, and each
    ``object`` start a third, in a home of its own, for as long as it runs. Run anyway,
    the kernel killed a worker mid-run (the 1.1B model on a 24 GB AVX2 machine, where
    the tier holds float32 copies: 2026-12-06)."""
    need = fill_bytes + worker_bytes + MEMORY_MARGIN_BYTES
    skipped: dict[str, str] = {}
    tiers = 1 + ("prewarmed_s3" in states) + ("object" in states)
    for state in ("object", "prewarmed_s3"):  # the third tier goes first, then the second
        if state in states and need + (tiers - 1) * fill_bytes > available_bytes:
            skipped[state] = (
                f"needs ~{(need + (tiers - 1) * fill_bytes) / GIB:.1f} GiB of RAM with "
                f"{tiers} host tiers of ~{fill_bytes / GIB:.1f} GiB; "
                f"{available_bytes / GIB:.1f} GiB available"
            )
            tiers -= 1
    return tuple(s for s in states if s not in skipped), skipped


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo: what the kernel can give without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class ModelRun:
    """One model's homes and tiers, and one timed cold start per state."""

    def __init__(self, name: str, model_dir: Path, work: Path, s3_url: str, threads: int) -> None:
        from ember_functions.engine_config import EngineConfig
        from ember_weights_store import ModelCatalog
        from ember_weights_store.s3_tier import S3Tier

        self.name = name
        self.model_dir = model_dir
        self.work = work
        self.s3_url = s3_url
        self.config = EngineConfig(num_threads=threads, kv_cache_bytes=64 << 20)
        self.home = work / "home"
        publisher = ModelCatalog(self.home)
        print(f"[{name}] importing into the bucket and S3 ...", flush=True)
        publisher.store().import_hf_dir(model_dir, model_id=name)
        # Installed in this home as `ember models add` would leave it (workers resolve the
        # name here, then load through the store).
        publisher.models_dir.mkdir(parents=True, exist_ok=True)
        (publisher.models_dir / name).symlink_to(model_dir)
        origin = S3Tier(bucket="models", prefix=name, endpoint_url=s3_url)
        ModelCatalog(work / "publisher").store(origin=origin).import_hf_dir(
            model_dir, model_id=name
        )
        self.host_bytes = _host_tier_bytes(model_dir)
        self._counter = 0
        self.encoder: Any = None  # the pool's, from its first worker (see first_workers)
        self.s3_encoder: Any = None  # the S3 pool's, from its own first worker
        # prewarmed_s3's pool: a home with nothing installed, its host tier filled from S3
        # by that pool's first worker (first_workers).
        self.s3_home = work / "s3-pool-home"
        self.ready_cached_tokens = 0  # of PROMPT, by a READY worker (the chat preamble)
        # What the pool's first worker did not leave for the rest, so later workers did
        # that work themselves: printed, and kept in the JSON (``notes``).
        self.notes: list[str] = []

    @property
    def host_roots(self) -> list[Path]:
        """The host tiers (tmpfs, outside the work directory) this run may fill."""
        return [
            Path(self._store("host").catalog(self.home).host_cache_root),
            Path(self._store("prewarmed_s3").catalog(self.s3_home).host_cache_root),
        ]

    @property
    def host_root(self) -> Path:
        return self.host_roots[0]

    def _store(self, state: str) -> Any:
        from ember_functions.loading import StoreConfig

        if state in ("object", "prewarmed_s3"):
            # object: a pool's worker on a machine that has never held the model, its host
            # tier (and disk tier) empty, everything in S3. prewarmed_s3: a pool with the
            # same origin, its zygote prepared, the host tier full (the same chunks).
            return StoreConfig(
                origin=f"s3://models/{self.name}",
                endpoint_url=self.s3_url,
                host_cache_bytes=self.host_bytes,
            )
        if state == "disk":
            return StoreConfig()
        return StoreConfig(host_cache_bytes=self.host_bytes)

    def _spawn(
        self, state: str, launcher: Any = None, home: Path | None = None, config: Any = None
    ) -> Any:
        from ember_functions.worker_process import WorkerProcess

        self._counter += 1
        return WorkerProcess.spawn(
            worker_id=f"cs{os.getpid()}-{self._counter}",
            model=self.name,
            home=home or self.home,
            engine_config=config or self.config,
            store=self._store(state),
            launcher=launcher,
            prompts=None
            if launcher is None
            else (self.s3_encoder if state == "prewarmed_s3" else self.encoder),
        )

    def first_workers(self, zygote: Any, *, s3_pool: bool) -> None:
        """What a pool does once, with its first worker: keep its prompt encoder for the
        router, and have the zygote parse the tokenizer and check the model's host-tier
        chunks (reading its manifest) for the workers it forks next. With ``s3_pool``, a
        second pool does the same from S3 into a home with nothing installed, as at scale:
        its first worker fetches the model into that home's host tier and packs it."""
        from ember_functions.loading import WeightsSource

        worker = self._spawn("host", zygote)
        try:
            self.encoder = worker.prompts
        finally:
            worker.close()
        zygote.prepare(
            self.encoder.tokenizer.source_dir,
            weights=WeightsSource(self.home, self.name, self._store("prewarmed")),
        )
        if not s3_pool:
            return
        worker = self._spawn("prewarmed_s3", zygote, self.s3_home)
        try:
            # Kept alive until its packed copy is in the pool's host tier (stored on a
            # thread), as a pool's first worker would be: closed at once, it took the copy
            # with it and the S3 pool's workers each ran their first request unpacked.
            self._leave_packed(worker, self.host_roots[1])
            self.s3_encoder = worker.prompts
        finally:
            worker.close()
        zygote.prepare(
            self.s3_encoder.tokenizer.source_dir,
            weights=WeightsSource(self.s3_home, self.name, self._store("prewarmed_s3")),
        )

    def prepare_tiers(self) -> None:
        """Fills the disk and host tiers: one load through each, promotions waited for;
        then one worker through the host tier, which leaves there what the first worker
        of a pool leaves for the rest: its packed matrices, once idle, and its bound
        weights if binding converts their dtype."""
        from ember_weights_store import load

        for state in ("disk", "host"):
            loaded = load(self._store(state).catalog(self.home).store(), self.name)
            loaded.wait_promoted()
            del loaded
        host = self.host_root
        worker = self._spawn("host")
        try:
            self._leave_packed(worker, host)
            if self._binding_converts() and not _appears(host, "bound/*-index", KEEP_TIMEOUT_S):
                self._note(
                    f"no bound weights in {host} after {KEEP_TIMEOUT_S:.0f} s: every worker "
                    "converts its own (the worker's warning above says why)"
                )
        finally:
            worker.close()

    def _leave_packed(self, worker: Any, host: Path) -> None:
        """Waits for ``worker`` to pack its matrices and leave them in the host tier at
        ``host``, as the first worker of a pool does for the rest."""
        if not worker.wait_packed(timeout_s=900):
            raise RuntimeError(f"worker {worker.worker_id} never packed its matrices")
        # Left on a thread once it has packed; not at all where packing does not apply,
        # or where packed matrices cannot be shared (``packed_cache.sharing_works``).
        packed = worker.packed is not None and worker.packed.pack_s > 0
        if not packed or not _appears(host, "packed/*-index", KEEP_TIMEOUT_S):
            self._note(f"no packed matrices in {host}: every worker packs its own")

    def _note(self, note: str) -> None:
        self.notes.append(note)
        print(f"[{self.name}] {note}", flush=True)

    def memory_bytes(self) -> tuple[int, int]:
        """(what a pool leaves in its host tier, a worker's own copy of the weights): the
        chunks, the bound weights where binding converts their dtype, the packed copy
        where packing applies, in the compute dtype. Binding a bf16 checkpoint in float32
        converts only the embedding and the norms, the matrices being left to packing
        (``weights.deferred_matrix_names``); a worker holds what it converts."""
        import torch

        from ember_functions.config import ModelConfig
        from ember_functions.linear import Linear
        from ember_functions.model import LlamaModel
        from ember_functions.weights import deferred_matrix_names

        stored, compute = self._dtypes()
        chunks = _checkpoint_bytes(self.model_dir)
        computed = chunks * compute.itemsize // stored.itemsize
        linear = Linear(device=torch.device("cpu"), dtype=compute)
        if not self._binding_converts():
            return chunks + linear.packs * computed, computed
        config = ModelConfig.from_dir(self.model_dir)
        deferred = set(deferred_matrix_names(config))
        params = LlamaModel(config, linear=linear).named_parameters()  # meta: shapes only
        bound = sum(p.numel() for n, p in params if n not in deferred) * compute.itemsize
        return chunks + bound + linear.packs * computed, bound

    def _dtypes(self) -> tuple[Any, Any]:
        """(the checkpoint's dtype, the dtype this CPU's engine computes it in)."""
        import torch

        from ember_functions.weights import checkpoint_dtype, resolve_compute_dtype

        stored = checkpoint_dtype(self.model_dir)
        cpu = torch.device("cpu")
        return stored, resolve_compute_dtype(self.config.dtype, weights_dtype=stored, device=cpu)

    def _binding_converts(self) -> bool:
        stored, compute = self._dtypes()
        return bool(compute != stored)

    def ready_ttft(self, *, prefix_cache: bool = True) -> tuple[float, int]:
        """(seconds, cached prompt tokens) to the first token from a READY worker: the
        median of ``READY_SAMPLES`` requests one after another, each a new tenant's (its
        own cache salt). A single ~40 ms sample on a shared 2-core machine swung by 20%
        between rounds (2026-12-06: 36 and 43 ms medians of three single samples)."""
        config = dataclasses.replace(self.config, prefix_cache=prefix_cache)
        worker = self._spawn("host", config=config)
        try:
            _first_token(worker, "warm")
            # A READY worker of a pool has been idle a moment, enough to cache the chat
            # preamble and pack its matrices (a layer per idle turn): wait for that too.
            if not worker.wait_packed(timeout_s=120):
                raise RuntimeError(f"worker {worker.worker_id} never packed its matrices")
            samples = [_first_token(worker, f"ready-{i}") for i in range(READY_SAMPLES)]
            return statistics.median(t for t, _ in samples), samples[0][1]
        finally:
            worker.close()

    def measure(self, state: str, zygote: Any) -> tuple[float, dict[str, float], str]:
        """(ttft_s, phases, tiers the chunks came from) of one cold start in ``state``."""
        if state == "ready":
            ttft, self.ready_cached_tokens = self.ready_ttft()
            return ttft, {p: 0.0 for p in PHASES} | {"first_token": ttft}, "-"
        home = None
        if state == "object":
            home = self.work / f"empty-{self._counter}"  # nothing installed, nothing cached
        if state == "disk":
            _io_limits.evict_page_cache(_io_limits.tree_files(self.home / "cache"))
        t0 = time.perf_counter()
        forked = state.startswith("prewarmed")
        pool_home = self.s3_home if state == "prewarmed_s3" else home
        worker = self._spawn(state, zygote if forked else None, pool_home)
        try:
            first, _ = _first_token(worker, state)
            ttft = time.perf_counter() - t0
            tiers = ",".join(sorted(worker.chunks_by_tier))
            return ttft, phases_of(worker, first), tiers
        finally:
            worker.close()
            if home is not None:
                host = self._store(state).catalog(home).host_cache_root
                shutil.rmtree(host, ignore_errors=True)
                shutil.rmtree(home, ignore_errors=True)

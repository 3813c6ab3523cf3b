"""Cold start: time to first token from each start state, and where the time goes.

    python bench/coldstart.py --json /tmp/coldstart.json [--png /tmp/coldstart.png]
        [--models smollm2,llama-1b] [--rounds 3] [--quick] [--states prewarmed,ready]

``--states`` with ``--no-peers`` and more ``--rounds`` is the A/B tool for one state: run
it on two checkouts (``PYTHONPATH`` set to each one's packages), interleaved.

For one request (a short chat prompt, one generated token), from the moment it arrives:

- ``object``: a new interpreter loads the weights from the object store (an S3 endpoint:
  moto's server on 127.0.0.1) into an empty home;
- ``disk``: a new interpreter, weights in the disk tier with their page cache evicted;
- ``host``: a new interpreter, weights in the host tier (/dev/shm), with what the
  machine's first worker of the model left there: its matrices packed for oneDNN
  (``packed_cache``), and its bound weights where binding converts their dtype;
- ``prewarmed``: a worker of a pool that is already running, forked from its zygote
  (imports done; the model's tokenizer parsed and its host-tier chunks checked once the
  first worker reported it) with the weights in the host tier, as ``host`` has them;
  the router reuses the first worker's prompt encoder;
- ``ready``: a READY worker that has served one request and, idle since, cached the
  chat template's preamble (the public prefix every tenant's chats share: 23 of this
  prompt's 37 tokens on SmolLM2) and packed its matrices, as it does once idle. The same
  with the prefix cache off (``ready_no_prefix_cache``) shows what the cached preamble
  is worth: there the whole prompt is prefilled.

Peers in the same run, what people write today: a fresh ``python`` running transformers
``AutoModelForCausalLM.from_pretrained`` on the same model from local disk and generating
the first token; and a fresh process starting vLLM's CPU build (``.venv-peers``, from
``bench/setup_peers.sh``; ``enforce_eager=True``) and generating the first token.
And the floor: a fresh ``python`` that only imports torch (collector off, as in a
worker). The object, disk and host
states start a new interpreter that imports torch too, so transformers' time over this
one (``speedup_ceiling_new_interpreter``) bounds their speedups on this machine.
Each state is measured ``--rounds`` times, interleaved, medians reported. Phases come
from the worker's own report: spawn (until it connects), imports, manifest, fetch,
decompress, bind (load minus the weights' wall time: building the model on the
weights), first token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _io_limits
import _random_llama

ROOT = Path(__file__).resolve().parents[1]
STATES = ("object", "disk", "host", "prewarmed", "ready")
MODELS = ("smollm2", "llama-1b")  # SmolLM2-135M as installed; the ~1B random-init Llama
# The repo's package directories, as scripts/setup.sh byte-compiles them.
PACKAGES = (
    "sdk",
    "billing",
    "core",
    "functions",
    "kv_tier",
    "platform",
    "warmpool",
    "weights_store",
)
MIN_FLOOR_SAMPLES = 3  # `import torch` alone, at least this many times per model
PHASES = ("spawn", "imports", "manifest", "fetch", "decompress", "bind", "first_token")
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _phases(worker: Any, first_token_s: float) -> dict[str, float]:
    p = worker.phases
    weights = p.get("weights_wall_s", 0.0)
    return {
        "spawn": p.get("spawn_s", 0.0),
        "imports": p.get("imports_s", 0.0),
        "manifest": p.get("manifest_s", 0.0),
        # The loader's fetch and decompress are summed over its threads; scale them to the
        # weights' wall time so the stacked phases add up to what a request waited.
        **_share(p, weights),
        "bind": max(0.0, p.get("load_s", 0.0) - weights),
        "first_token": first_token_s,
    }


def _share(p: dict[str, float], wall_s: float) -> dict[str, float]:
    fetch, decompress = p.get("fetch_s", 0.0), p.get("decompress_s", 0.0)
    total = fetch + decompress
    if total <= 0:
        return {"fetch": wall_s, "decompress": 0.0}
    return {"fetch": wall_s * fetch / total, "decompress": wall_s * decompress / total}


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
        self.host_bytes = 8 << 30
        self._counter = 0
        self.encoder: Any = None  # the pool's, from its first worker (see first_worker)
        self.ready_cached_tokens = 0  # of PROMPT, by a READY worker (the chat preamble)

    @property
    def host_root(self) -> Path:
        return Path(self._store("host").catalog(self.home).host_cache_root)

    def _store(self, state: str) -> Any:
        from ember_functions.loading import StoreConfig

        if state == "object":
            return StoreConfig(
                origin=f"s3://models/{self.name}", endpoint_url=self.s3_url, disk_cache_bytes=0
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
            prompts=self.encoder if launcher is not None else None,
        )

    def first_worker(self, zygote: Any) -> None:
        """What a pool does once, with its first worker: keep its prompt encoder for the
        router, and have the zygote parse the tokenizer and check the model's host-tier
        chunks for the workers it forks next."""
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
            if not worker.wait_packed(timeout_s=900):
                raise RuntimeError(f"worker {worker.worker_id} never packed its matrices")
            if self._binding_converts() and not _appears(host, "bound/*-index", 900):
                raise RuntimeError(f"the first worker kept no bound weights in {host}")
            # Left on a thread once it has packed; not at all where packing does not apply,
            # or where packed matrices cannot be shared (``packed_cache.sharing_works``).
            packed = worker.packed is not None and worker.packed.pack_s > 0
            if not packed or not _appears(host, "packed/*-index", 60):
                print(
                    f"[{self.name}] no packed matrices in the host tier: every worker "
                    "packs its own",
                    flush=True,
                )
        finally:
            worker.close()

    def _binding_converts(self) -> bool:
        import torch

        from ember_functions.weights import checkpoint_dtype, resolve_compute_dtype

        stored = checkpoint_dtype(self.model_dir)
        cpu = torch.device("cpu")
        return resolve_compute_dtype(self.config.dtype, weights_dtype=stored, device=cpu) != stored

    def ready_ttft(self, *, prefix_cache: bool = True) -> tuple[float, int]:
        """(seconds, cached prompt tokens) to the first token from a READY worker."""
        config = dataclasses.replace(self.config, prefix_cache=prefix_cache)
        worker = self._spawn("host", config=config)
        try:
            _first_token(worker, "warm")
            # A READY worker of a pool has been idle a moment, enough to cache the chat
            # preamble and pack its matrices (a layer per idle turn): wait for that too.
            if not worker.wait_packed(timeout_s=120):
                raise RuntimeError(f"worker {worker.worker_id} never packed its matrices")
            return _first_token(worker, "ready")
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
        worker = self._spawn(state, zygote if state == "prewarmed" else None, home)
        try:
            first, _ = _first_token(worker, state)
            ttft = time.perf_counter() - t0
            tiers = ",".join(sorted(worker.chunks_by_tier))
            return ttft, _phases(worker, first), tiers
        finally:
            worker.close()
            if home is not None:
                shutil.rmtree(home, ignore_errors=True)


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


def import_torch_s(threads: int) -> float:
    """A fresh interpreter that imports torch and stops: the floor under the three
    new-interpreter states, which import it too (as the transformers peer does). With
    the cyclic collector off while it imports, as a worker imports (0.2-0.3 s less here
    than a plain ``import torch``), so that the floor is one our workers cannot beat."""
    code = (
        "import gc\ngc.disable()\nimport torch\n"
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


def run_model(
    name: str,
    model_dir: Path,
    s3_url: str,
    *,
    rounds: int,
    threads: int,
    peers: bool,
    states: tuple[str, ...] = STATES,
) -> dict[str, Any]:

    with tempfile.TemporaryDirectory(prefix="ember-coldstart-") as tmp:
        run = ModelRun(name, model_dir, Path(tmp), s3_url, threads)
        try:
            return _measure_model(
                run, name, model_dir, rounds=rounds, threads=threads, peers=peers, states=states
            )
        finally:
            # The host tier is RAM (tmpfs) outside the temporary home: give it back.
            shutil.rmtree(run.host_root, ignore_errors=True)


def _measure_model(
    run: ModelRun,
    name: str,
    model_dir: Path,
    *,
    rounds: int,
    threads: int,
    peers: bool,
    states: tuple[str, ...],
) -> dict[str, Any]:
    from ember_functions.launch import Zygote

    run.prepare_tiers()
    ttft: dict[str, list[float]] = {s: [] for s in states}
    phases: dict[str, list[dict[str, float]]] = {s: [] for s in states}
    tiers: dict[str, str] = {}
    peer_ttft: dict[str, list[float]] = {"transformers": [], "vllm": []}
    uncached: list[float] = []  # ready, prefix cache off: the whole prompt prefilled
    floor: list[float] = []
    peer_errors: dict[str, str] = {}
    with Zygote.start(zygote_id=f"cs{os.getpid()}") as zygote:
        run.first_worker(zygote)
        for r in range(rounds):
            for state in states:
                t, p, where = run.measure(state, zygote)
                ttft[state].append(t)
                phases[state].append(p)
                tiers[state] = where
            if "ready" in states:
                uncached.append(run.ready_ttft(prefix_cache=False)[0])
            floor.append(import_torch_s(threads))
            if peers:
                peer_ttft["transformers"].append(transformers_ttft(model_dir, threads))
                v = vllm_ttft(model_dir, threads) if r == 0 else None
                if isinstance(v, float):
                    peer_ttft["vllm"].append(v)
                elif isinstance(v, str):
                    peer_errors["vllm"] = v
            print(f"[{name}] round {r + 1}/{rounds} done", flush=True)
        # The floor needs a few samples even when the states get one (--quick): one import
        # alone, on a busy machine, has landed above a whole worker's start.
        while len(floor) < MIN_FLOOR_SAMPLES:
            floor.append(import_torch_s(threads))
    out: dict[str, Any] = {"model": name, "rounds": rounds, "states": list(states), "tiers": tiers}
    for state in states:
        out[f"ttft_s_{state}"] = statistics.median(ttft[state])
        out[f"phases_{state}"] = {
            ph: statistics.median(p[ph] for p in phases[state]) for ph in PHASES
        }
    for peer, values in peer_ttft.items():
        out[f"ttft_s_{peer}"] = statistics.median(values) if values else None
    out["peer_errors"] = peer_errors
    base = out["ttft_s_transformers"]
    for state in states:
        out[f"speedup_{state}"] = base / out[f"ttft_s_{state}"] if base else None
    if uncached:
        out["ttft_s_ready_no_prefix_cache"] = statistics.median(uncached)
        out["speedup_ready_no_prefix_cache"] = (
            base / out["ttft_s_ready_no_prefix_cache"] if base else None
        )
        out["cached_tokens_ready"] = run.ready_cached_tokens
        out["prompt_tokens"] = len(run.encoder.tokenizer.encode_chat(PROMPT))
    vllm = out["ttft_s_vllm"]
    disk = out.get("ttft_s_disk")
    out["speedup_vllm_disk"] = vllm / disk if vllm and disk else None
    # No worker that needs torch, started as a new interpreter, can beat this ratio here.
    # The fastest import, not the median: noise only adds time, and a floor must be one
    # (CI saw a median of three at 1.36 s while a whole disk start, imports included,
    # took 1.22 s in the same run).
    out["import_torch_s"] = min(floor)
    out["speedup_ceiling_new_interpreter"] = base / out["import_torch_s"] if base else None
    return out


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: time to first token, seconds (median of {res['rounds']})")
    head = f"{'state':<12}{'ttft':>8}{'x tfm':>8}  " + "".join(f"{p:>12}" for p in PHASES)
    print(head + "   tiers")
    for state in res["states"]:
        ph = res[f"phases_{state}"]
        speed = res[f"speedup_{state}"]
        print(
            f"{state:<12}{res[f'ttft_s_{state}']:>8.3f}"
            f"{(f'{speed:.1f}' if speed else '-'):>8}  "
            + "".join(f"{ph[p]:>12.3f}" for p in PHASES)
            + f"   {res['tiers'].get(state, '')}"
        )
    if "ttft_s_ready_no_prefix_cache" in res:
        t, speed = res["ttft_s_ready_no_prefix_cache"], res["speedup_ready_no_prefix_cache"]
        print(
            f"{'ready, no prefix cache':<12}{t:>8.3f}{(f'{speed:.1f}' if speed else '-'):>8}  "
            f"(ready reused {res['cached_tokens_ready']} of the prompt's "
            f"{res['prompt_tokens']} tokens: the chat preamble)"
        )
    for peer in ("transformers", "vllm"):
        t = res[f"ttft_s_{peer}"]
        note = res["peer_errors"].get(peer, "")
        print(f"{peer:<12}{(f'{t:.3f}' if t else '-'):>8}   {note}")
    ceiling = res["speedup_ceiling_new_interpreter"]
    print(
        f"{'import torch':<12}{res['import_torch_s']:>8.3f}"
        f"{(f'{ceiling:.1f}' if ceiling else '-'):>8}  a new interpreter importing torch, "
        "nothing else, fastest of several: the ceiling of object, disk and host"
    )


def draw(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no PNG: matplotlib is not installed (pip install matplotlib); {path} skipped")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        states = res["states"]
        labels = [*states, "transformers", "vllm"]
        bottom = [0.0] * len(labels)
        for ph in PHASES:
            heights = [res[f"phases_{s}"][ph] for s in states] + [0.0, 0.0]
            ax.bar(labels, heights, bottom=bottom, label=ph)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        peers = [res["ttft_s_transformers"] or 0.0, res["ttft_s_vllm"] or 0.0]
        ax.bar(labels[-2:], peers, color="grey", label="peer, total")
        # Linear: stacked phases on a log axis would misstate their shares.
        ax.axhline(res["import_torch_s"], color="black", linestyle=":", linewidth=1)
        ax.annotate(
            "import torch (new interpreter)",
            (len(labels) - 0.5, res["import_torch_s"]),
            ha="right",
            va="bottom",
            fontsize=7,
        )
        totals = [res[f"ttft_s_{s}"] for s in states] + peers
        for x, total in enumerate(totals):
            if total:
                ax.annotate(f"{total:.2f} s", (x, total), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("seconds to first token")
        ax.set_title(res["model"])
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _byte_compile_packages() -> None:
    """Brings the repo's bytecode up to date, as a deployed install has it (pip compiles
    a regular install; ``scripts/setup.sh`` compiles this editable one). Edits since then
    would otherwise be compiled again by every worker this script starts wherever
    bytecode is not written on import (PYTHONDONTWRITEBYTECODE): ~40 ms of each new
    interpreter's start here, a cost of this checkout, not of Ember."""
    import compileall

    for package in PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1, workers=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: smollm2, llama-1b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument(
        "--states",
        default=",".join(STATES),
        help="which start states to measure (comma-separated), e.g. prewarmed for an A/B",
    )
    ap.add_argument("--quick", action="store_true", help="one round, SmolLM2 only")
    args = ap.parse_args()
    models = ["smollm2"] if args.quick else args.models.split(",")
    rounds = 1 if args.quick else args.rounds
    states = tuple(args.states.split(","))
    unknown = sorted(set(states) - set(STATES))
    if unknown:
        ap.error(f"unknown state(s) {', '.join(unknown)}; pick from {', '.join(STATES)}")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; pick from {', '.join(MODELS)}")

    import boto3

    from ember_weights_store import ModelCatalog

    _byte_compile_packages()

    port = _io_limits.free_port()
    moto = _io_limits.start_moto(port)
    s3_url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1"
    )
    boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket="models")
    results: list[dict[str, Any]] = []
    try:
        for name in models:
            if name == "smollm2":
                home = Path(os.environ.get("EMBER_HOME", Path.home() / ".cache" / "ember"))
                model_dir = Path(ModelCatalog(home).add("smollm2-135m", progress=False))
            else:
                model_dir = _random_llama.build(
                    ROOT / ".cache" / "bench" / "llama-1b-random", seed=0, with_tokenizer=True
                )
            res = run_model(
                name,
                model_dir,
                s3_url,
                rounds=rounds,
                threads=args.threads,
                peers=args.peers,
                states=states,
            )
            print_table(res)
            results.append(res)
    finally:
        moto.kill()
    out = dict(results[0])
    for res in results[1:]:
        out["model_1b" if res["model"] == "llama-1b" else res["model"]] = res
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    if args.png:
        draw(results, args.png)


if __name__ == "__main__":
    main()

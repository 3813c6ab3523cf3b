"""Cold start: time to first token from each start state, and where the time goes.

    python bench/coldstart.py --json /tmp/coldstart.json [--png /tmp/coldstart.png]
        [--models smollm2,llama-1b] [--rounds 3] [--quick] [--states prewarmed,ready]

``--states`` with ``--no-peers`` and more ``--rounds`` is the A/B tool for one state: run
it on two checkouts (``PYTHONPATH`` set to each one's packages), interleaved.

For one request (a short chat prompt, one generated token), from the moment it arrives:

- ``object``: a new interpreter loads the weights from the object store (an S3 endpoint:
  moto's server on 127.0.0.1) into an empty home: a pool's worker on a machine that has
  never held the model, its host tier (and disk tier) empty. Its readahead child fetches
  and decodes the chunks into the host tier while the worker imports torch. (Before
  2026-12-06 this state had no host or disk tier, and the worker fetched after its
  imports.) moto serves from this machine's two cores too, which S3 would not;
- ``disk``: a new interpreter, weights in the disk tier with their page cache evicted;
- ``host``: a new interpreter, weights in the host tier (/dev/shm), with what the
  machine's first worker of the model left there: its matrices packed for oneDNN
  (``packed_cache``), its bound weights where binding converts their dtype, and the
  chat preamble's KV (``prefix_kv_cache``, since 2026-12-06, fifth session: before, a
  new worker's first request prefilled the preamble too);
- ``prewarmed``: a worker of a pool that is already running, forked from its zygote
  (imports done; the model's tokenizer parsed and its host-tier chunks checked once the
  first worker reported it) with the weights in the host tier, as ``host`` has them;
  the router reuses the first worker's prompt encoder;
- ``prewarmed_s3``: the same in a pool as at scale: its origin is S3 and its home has
  nothing installed; the pool's first worker fetched the model into the host tier and
  packed it there, then the zygote was prepared for that source, as ``prewarmed``'s
  (before 2026-12-06, third session, that prepare was refused, the model not being
  installed, so each such worker checked its chunks and read the manifest from S3);
- ``ready``: a READY worker that has served one request and, idle since, cached the
  chat template's preamble (the public prefix every tenant's chats share: 23 of this
  prompt's 37 tokens on SmolLM2) and packed its matrices, as it does once idle. The same
  with the prefix cache off (``ready_no_prefix_cache``) shows what the cached preamble
  is worth: there the whole prompt is prefilled.

Peers in the same run, what people write today: a fresh ``python`` running transformers
``AutoModelForCausalLM.from_pretrained`` on the same model from local disk and generating
the first token; and a fresh process starting vLLM's CPU build (``.venv-peers``, from
``bench/setup_peers.sh``; ``enforce_eager=True``) and generating the first token.
And the floors: a fresh ``python`` that only imports torch (collector off, as in a
worker; ``import_torch_s``), and one that imports it as a new worker does, with the
modules it defers until idle (``ember_functions.deferred_imports``;
``import_torch_deferred_s``). The object, disk and host states start a new interpreter
that imports torch that way, so transformers' time over the second
(``speedup_ceiling_new_interpreter``) bounds their speedups on this machine.
States whose host tiers would not fit in this machine's RAM (``object`` and
``prewarmed_s3`` each fill another) are skipped, with the reason printed and kept in the
JSON (``skipped_states``); so is what the pool's first worker could not leave in the host
tier for the rest (its packed matrices, its bound weights: ``notes``). Each state is
measured ``--rounds`` times, interleaved, medians reported. Phases come from the
worker's own report: spawn (until it connects), imports, manifest, fetch, decompress,
bind (load minus the weights' wall time: building the model on the weights), first
token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _io_limits
import _random_llama
from _coldstart_peers import PROMPT, import_torch_s, transformers_ttft, vllm_ttft
from _coldstart_report import PHASES, draw, print_table
from _coldstart_states import ModelRun, available_bytes, states_that_fit

ROOT = Path(__file__).resolve().parents[1]
STATES = ("object", "disk", "host", "prewarmed", "prewarmed_s3", "ready")
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
        fill, worker = run.memory_bytes()
        states, skipped = states_that_fit(
            states, fill_bytes=fill, worker_bytes=worker, available_bytes=available_bytes()
        )
        for state, why in skipped.items():
            print(f"[{name}] skipping {state}: {why}", flush=True)
        try:
            out = _measure_model(
                run, name, model_dir, rounds=rounds, threads=threads, peers=peers, states=states
            )
            out["skipped_states"] = skipped
            out["notes"] = run.notes
            return out
        finally:
            # The host tiers are RAM (tmpfs) outside the temporary homes: give them back.
            for root in run.host_roots:
                shutil.rmtree(root, ignore_errors=True)


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
    floor: list[float] = []  # import torch, all of it
    floor_deferred: list[float] = []  # as a new worker imports it (deferred_imports)
    peer_errors: dict[str, str] = {}
    with Zygote.start(zygote_id=f"cs{os.getpid()}") as zygote:
        run.first_workers(zygote, s3_pool="prewarmed_s3" in states)
        for r in range(rounds):
            for state in states:
                t, p, where = run.measure(state, zygote)
                ttft[state].append(t)
                phases[state].append(p)
                tiers[state] = where
            if "ready" in states:
                uncached.append(run.ready_ttft(prefix_cache=False)[0])
            floor.append(import_torch_s(threads))
            floor_deferred.append(import_torch_s(threads, deferred=True))
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
            floor_deferred.append(import_torch_s(threads, deferred=True))
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
    # Our new-interpreter workers import less than all of torch before serving (since
    # 2026-12-06, fourth session): their floor is this one; before, it was the above.
    out["import_torch_deferred_s"] = min(floor_deferred)
    ceiling = out["import_torch_deferred_s"]
    out["speedup_ceiling_new_interpreter"] = base / ceiling if base else None
    return out


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
            try:
                res = run_model(
                    name,
                    model_dir,
                    s3_url,
                    rounds=rounds,
                    threads=args.threads,
                    peers=args.peers,
                    states=states,
                )
            except Exception as exc:  # the other model's figures are still worth writing
                traceback.print_exc()
                results.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
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
    drawn = [r for r in results if "error" not in r]
    if args.png and drawn:
        draw(drawn, args.png)
    failed = [r["model"] for r in results if "error" in r]  # their entries say why
    if failed:
        sys.exit(f"the run failed for {', '.join(failed)}: see the traceback above")


if __name__ == "__main__":
    main()

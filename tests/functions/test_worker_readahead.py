"""Chunks checked before a worker loads are not hashed again on its way to READY: a new
interpreter checks its own while torch imports, a zygote checks them once for every
worker it forks (``Zygote.prepare(weights=)``)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ember_functions.engine_config import EngineConfig
from ember_functions.launch import Zygote
from ember_functions.loading import StoreConfig, WeightsSource
from ember_functions.rpc import Warmth
from ember_functions.sampling_params import SamplingParams
from ember_functions.worker_process import WorkerProcess
from ember_weights_store.loader import load

CONFIG = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1)
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture
def home(tiny_home: Path) -> Path:
    """A home with the tiny model installed, as ``ember models add`` leaves one."""
    return tiny_home


def _spawn(home: Path, store: StoreConfig, launcher: Zygote | None = None) -> WorkerProcess:
    return WorkerProcess.spawn(
        worker_id=f"ra-{os.getpid()}-{time.monotonic_ns()}",
        model="tiny",
        home=home,
        engine_config=CONFIG,
        store=store,
        launcher=launcher,
    )


def _tokens(worker: WorkerProcess, rid: str) -> list[int]:
    request = worker.prepare([1, 2, 3], GREEDY, request_id=rid)
    return worker.submit_prepared(request).result().token_ids


def test_a_new_interpreter_checks_its_chunks_while_torch_imports(home: Path) -> None:
    store = StoreConfig()  # the disk tier in front of the home's bucket
    n = len(load(store.catalog(home).store(), "tiny").manifest.chunks)  # fills the disk tier

    worker = _spawn(home, store)
    try:
        assert worker.chunks_by_tier == {"disk": n}
        assert worker.phases["verify_s"] == 0.0, worker.phases  # the readahead checked them
        assert len(_tokens(worker, "r")) == GREEDY.max_tokens
    finally:
        worker.close()


def test_a_new_interpreter_tells_its_router_the_tokenizer_before_it_loads(home: Path) -> None:
    # Its readahead child writes the tokenizer's files first and says where: the router
    # parses them while torch imports. Parked at PROCESS, the worker has loaded nothing,
    # and the router's parse is under way all the same.
    worker = WorkerProcess.spawn(
        worker_id=f"ra-{os.getpid()}-{time.monotonic_ns()}",
        model="tiny",
        home=home,
        engine_config=CONFIG,
        store=StoreConfig(),
        warmth=Warmth.PROCESS,
    )
    try:
        early = worker._prompts.early
        assert early is not None
        tokenizer_dir, parse = early
        assert (Path(tokenizer_dir) / "tokenizer.json").is_file()
        assert Path(tokenizer_dir).is_relative_to(home)
        assert parse.result(timeout=60).source_dir == Path(tokenizer_dir)
        worker.promote()
        assert len(_tokens(worker, "r")) == GREEDY.max_tokens
        # The encoder READY used is the one parsed early, not a second parse.
        assert worker.prompts.tokenizer is parse.result()
    finally:
        worker.close()


def test_a_zygote_checks_the_host_tier_once_for_the_workers_it_forks(home: Path) -> None:
    store = StoreConfig(host_cache_bytes=64 << 20)
    loaded = load(store.catalog(home).store(), "tiny")
    loaded.wait_promoted()  # the host tier holds it
    n = len(loaded.manifest.chunks)
    with Zygote.start(zygote_id=f"ra{os.getpid()}-{time.monotonic_ns()}") as zygote:
        first = _spawn(home, store, zygote)
        try:
            expected = _tokens(first, "first")
            assert first.phases["verify_s"] > 0  # nothing checked for it: it hashed them
            zygote.prepare(
                first.prompts.tokenizer.source_dir or Path(),
                weights=WeightsSource(home, "tiny", store),
            )
        finally:
            first.close()
        second = _spawn(home, store, zygote)
        try:
            assert second.chunks_by_tier == {"host": n}
            assert second.phases["verify_s"] == 0.0, second.phases
            assert _tokens(second, "second") == expected
        finally:
            second.close()


def test_weights_the_zygote_cannot_check_are_left_to_the_workers(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StoreConfig()
    load(store.catalog(home).store(), "tiny")
    with Zygote.start(zygote_id=f"ra{os.getpid()}-{time.monotonic_ns()}") as zygote:
        first = _spawn(home, store, zygote)
        try:
            tokenizer_dir = first.prompts.tokenizer.source_dir or Path()
        finally:
            first.close()
        with caplog.at_level("WARNING"):
            zygote.prepare(tokenizer_dir, weights=WeightsSource(home, "no-such-model", store))
        assert any("could not prepare" in r.getMessage() for r in caplog.records)
        worker = _spawn(home, store, zygote)
        try:
            assert worker.phases["verify_s"] > 0  # it checked its chunks itself
            assert len(_tokens(worker, "r")) == GREEDY.max_tokens
        finally:
            worker.close()


def test_a_zygote_prepared_for_an_s3_origin_hands_its_workers_the_manifest(
    s3_endpoint: str, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    import boto3

    from ember_weights_store import ModelCatalog
    from ember_weights_store.s3_tier import S3Tier
    from ember_weights_store.store import manifest_key

    bucket = f"zygote-{uuid.uuid4().hex[:12]}"  # moto's buckets outlive a test: this one's own
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    origin = S3Tier(bucket=bucket, prefix="ember", endpoint_url=s3_endpoint)
    ModelCatalog(tmp_path / "publisher").store(origin=origin).import_hf_dir(
        tiny_model("llama"), model_id="tiny"
    )
    home = tmp_path / "fresh"  # nothing installed: the model is the origin's
    store = StoreConfig(
        origin=f"s3://{bucket}/ember", endpoint_url=s3_endpoint, host_cache_bytes=64 << 20
    )
    try:
        with Zygote.start(zygote_id=f"ra{os.getpid()}-{time.monotonic_ns()}") as zygote:
            first = _spawn(home, store, zygote)
            try:
                expected = _tokens(first, "first")
                # Refused before: the model is not installed in the home, only in S3.
                zygote.prepare(
                    first.prompts.tokenizer.source_dir or Path(),
                    weights=WeightsSource(home, "tiny", store),
                )
            finally:
                first.close()
            second = _spawn(home, store, zygote)  # its fork waits for the zygote's check
            try:
                assert second.phases["verify_s"] == 0.0, second.phases  # checked by the zygote
                assert list(second.chunks_by_tier) == ["host"]
                assert _tokens(second, "second") == expected
            finally:
                second.close()
            # The zygote read the manifest while preparing; its workers do not read it
            # again, so they load with it gone from S3.
            assert origin.delete(manifest_key("tiny", "main"))
            third = _spawn(home, store, zygote)
            try:
                assert _tokens(third, "third") == expected
            finally:
                third.close()
    finally:
        shutil.rmtree(ModelCatalog(home).host_cache_root, ignore_errors=True)

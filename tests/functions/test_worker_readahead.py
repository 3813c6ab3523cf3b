"""A worker in a new interpreter reads and checks its chunks while torch imports."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ember_functions.engine_config import EngineConfig
from ember_functions.loading import StoreConfig
from ember_functions.sampling_params import SamplingParams
from ember_functions.worker_process import WorkerProcess
from ember_weights_store import ModelCatalog
from ember_weights_store.loader import load

CONFIG = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1)


def test_chunks_checked_during_the_imports_are_not_hashed_again_on_the_way_to_ready(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = tiny_model("llama")
    home = tmp_path / "home"
    catalog = ModelCatalog(home)  # installed as `ember models add` leaves a model
    catalog.store().import_hf_dir(model_dir, model_id="tiny")
    catalog.models_dir.mkdir(parents=True)
    (catalog.models_dir / "tiny").symlink_to(model_dir)
    store = StoreConfig()  # the disk tier in front of the home's bucket
    n = len(load(store.catalog(home).store(), "tiny").manifest.chunks)  # fills the disk tier

    worker = WorkerProcess.spawn(
        worker_id=f"ra-{os.getpid()}", model="tiny", home=home, engine_config=CONFIG, store=store
    )
    try:
        assert worker.chunks_by_tier == {"disk": n}
        assert worker.phases["verify_s"] == 0.0, worker.phases  # the readahead checked them
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        done = worker.submit_prepared(worker.prepare([1, 2, 3], params, request_id="r")).result()
        assert len(done.token_ids) == 4
    finally:
        worker.close()

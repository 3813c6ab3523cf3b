"""Worker processes for the tests: spawned on the tiny model with a unique id and sent
requests (read them with ``streams.result_within``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ember_functions.engine_config import EngineConfig
from ember_functions.sampling_params import SamplingParams
from ember_functions.stream import RequestStream
from ember_functions.worker_process import WorkerProcess

TIMEOUT_S = 60.0
CONFIG = EngineConfig(dtype="float32", num_kv_blocks=256, block_size=16, num_threads=1)
GREEDY_16 = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def spawn(
    model: Path, home: Path, worker_id: str = "", *, config: EngineConfig = CONFIG
) -> WorkerProcess:
    return WorkerProcess.spawn(
        worker_id=worker_id or f"t{os.getpid()}-{time.monotonic_ns()}",
        model=str(model),
        home=home,
        engine_config=config,
    )


def submit(
    worker: WorkerProcess, prompt: object, params: SamplingParams, rid: str
) -> RequestStream:
    return worker.submit_prepared(worker.prepare(prompt, params, request_id=rid))  # type: ignore[arg-type]

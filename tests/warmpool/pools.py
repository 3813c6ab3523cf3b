"""What the warm-pool tests share: the engine settings, requests and waits."""

from __future__ import annotations

from ember_functions.engine_config import EngineConfig
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import RequestOutput
from ember_platform.pool_router import PoolRouter
from ember_warmpool.manager import ModelPool

TIMEOUT_S = 60.0
# One sequence per worker: a second concurrent request needs a second worker.
ONE_SEQ = EngineConfig(
    dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1, max_num_seqs=1
)
LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def live(pool: ModelPool) -> list[dict[str, object]]:
    return [row for row in pool.status() if row["state"] in ("STARTING", "READY", "BUSY")]


async def collect(
    router: PoolRouter, model: str, rid: str, params: SamplingParams
) -> list[RequestOutput]:
    prepared = router.prepare(model, [1, 2, 3, 4, 5], params, request_id=rid, tenant="t")
    return [out async for out in router.start(prepared)]

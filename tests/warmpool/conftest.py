"""The warm-pool tests' fixtures: a zygote per module and pools of the tiny model on it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ember_functions.launch import Zygote
from ember_warmpool import PoolPolicy
from ember_warmpool.manager import ModelPool

from .pools import ONE_SEQ


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    with Zygote.start(zygote_id=f"pool{os.getpid()}") as z:
        yield z


@pytest.fixture
def make_pool(
    tiny_model: Callable[..., Path], tmp_path: Path, zygote: Zygote
) -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(policy: PoolPolicy, *, model: Path | None = None, **options: Any) -> ModelPool:
        pool = ModelPool(
            str(model or tiny_model("llama")),
            home=tmp_path,
            policy=policy,
            launcher=zygote,
            **{"engine_config": ONE_SEQ, "tick_s": 0.05, **options},
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()

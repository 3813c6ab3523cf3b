"""A pool's workers share one parsed tokenizer: the zygote parses it once for the children
it forks next (``Zygote.prepare``), and the router reuses its first worker's prompt encoder
(``WorkerProcess.spawn(prompts=)``). Parsing SmolLM2's costs ~0.15 s on each side, most
of what is left of a prewarmed start."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember_core import EngineError
from ember_functions.engine_config import EngineConfig
from ember_functions.launch import Zygote
from ember_functions.sampling_params import SamplingParams
from ember_functions.worker_process import WorkerProcess
from ember_functions.worker_prompts import RemoteRequest

CONFIG = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [5, 17, 42, 8, 99, 3]


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    # One per test: ``prepare`` leaves a parsed tokenizer in it for good.
    with Zygote.start(zygote_id=f"tok{os.getpid()}-{time.monotonic_ns()}") as z:
        yield z


@pytest.fixture
def spawn(tmp_path: Path, zygote: Zygote) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def make(model: Path, **kwargs: object) -> WorkerProcess:
        w = WorkerProcess.spawn(
            worker_id=f"tok{os.getpid()}-{time.monotonic_ns()}",
            model=str(model),
            home=tmp_path / "home",
            launcher=zygote,
            **{"engine_config": CONFIG, **kwargs},  # type: ignore[arg-type]
        )
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.close()


def tokens(worker: WorkerProcess, rid: str) -> list[int]:
    request = RemoteRequest(rid, worker.prompts.encode(PROMPT, GREEDY), GREEDY, "")
    return worker.submit_prepared(request).result().token_ids


def _hide_tokenizer(model: Path) -> None:
    (model / "tokenizer.json").rename(model / "tokenizer.json.hidden")


def test_after_prepare_forked_workers_start_without_reading_the_tokenizer(
    copy_model: Callable[..., Path], spawn: Callable[..., WorkerProcess], zygote: Zygote
) -> None:
    model = copy_model("llama")
    first = spawn(model)
    expected = tokens(first, "first")
    zygote.prepare(model.resolve())
    _hide_tokenizer(model)  # only an inherited, parsed tokenizer can serve now

    second = spawn(model, prompts=first.prompts)

    assert second.prompts is first.prompts  # the router did not parse it either
    assert tokens(second, "second") == expected


def test_without_prepare_a_worker_parses_the_tokenizer_itself(
    copy_model: Callable[..., Path], spawn: Callable[..., WorkerProcess]
) -> None:
    model = copy_model("llama")
    first = spawn(model)
    _hide_tokenizer(model)
    with pytest.raises(EngineError, match=r"tokenizer\.json"):
        spawn(model, prompts=first.prompts)


def test_an_encoder_for_another_window_is_not_reused(
    copy_model: Callable[..., Path], spawn: Callable[..., WorkerProcess]
) -> None:
    model = copy_model("llama")
    first = spawn(model)
    narrow = EngineConfig(
        dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1, max_model_len=64
    )
    second = spawn(model, engine_config=narrow, prompts=first.prompts)
    assert second.prompts is not first.prompts
    assert second.prompts.token_capacity == 64 < first.prompts.token_capacity


def test_a_tokenizer_the_zygote_cannot_parse_is_left_to_the_workers(
    copy_model: Callable[..., Path],
    spawn: Callable[..., WorkerProcess],
    zygote: Zygote,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-model"
    with caplog.at_level("WARNING"):
        zygote.prepare(missing)
    assert any(str(missing) in r.getMessage() for r in caplog.records)
    model = copy_model("llama")
    assert len(tokens(spawn(model), "after")) == GREEDY.max_tokens  # the zygote still forks
    shutil.rmtree(model)

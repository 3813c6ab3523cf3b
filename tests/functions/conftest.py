"""Fixtures for the function worker's tests: engines over tiny models, and a KV-block
leak check that runs after every test in this folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember_core import NotFoundError
from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.host_model import HostModel
from ember_weights_store import ModelCatalog

EngineFactory = Callable[..., LLMEngine]
LeakReport = Callable[[LLMEngine], str | None]
HostModelFactory = Callable[[ModelCatalog, Path], HostModel]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine an
    # OpenMP pool that spins against other processes makes steps 10-100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def edit_config(model_dir: Path, **changes: Any) -> None:
    """Rewrites a model's config.json: each change sets a key, or removes it where None."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def edit_weights(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Rewrites a model's model.safetensors after ``edit`` changed its tensors in place."""
    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


def no_matrix_bound(engine: LLMEngine) -> bool:
    """Whether binding left every layer's matrices unconverted (on the meta device)."""
    layers = engine.model.decoder_layers
    return all(w.is_meta for layer in layers for w in layer.matrices().values())


def kv_leak_report(engine: LLMEngine) -> str | None:
    """None when every KV block of an idle engine is free (but the public prefix's, which
    it pins for good), else what holds them."""
    blocks = engine.blocks
    if blocks.num_free_blocks + blocks.num_pinned_blocks == blocks.num_blocks:
        return None
    held = [b for b, refs in enumerate(blocks._ref_count) if refs]
    sched = engine.scheduler
    return (
        f"engine for {engine.model_name!r} has no unfinished requests but holds "
        f"{blocks.num_blocks - blocks.num_free_blocks} of {blocks.num_blocks} KV blocks "
        f"(blocks with references: {held[:16]}{' ...' if len(held) > 16 else ''}; "
        f"scheduler running={[s.request_id for s in sched.running]}, "
        f"waiting={[s.request_id for s in sched.waiting]}). A finished, cancelled or "
        "failed request did not give its blocks back."
    )


@pytest.fixture
def leak_report() -> LeakReport:
    """The check the autouse leak fixture runs, for tests of the check itself."""
    return kv_leak_report


@pytest.fixture(autouse=True)
def _kv_blocks_released(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[LLMEngine]]:
    """Tracks every LLMEngine built during the test; afterwards each one that has no
    unfinished requests must have all of its KV blocks free."""
    engines: list[LLMEngine] = []
    original_init = LLMEngine.__init__

    def tracking_init(self: LLMEngine, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(LLMEngine, "__init__", tracking_init)
    yield engines
    problems = [
        f"engine #{i}: {report}"
        for i, engine in enumerate(engines)
        if not engine.has_unfinished() and (report := kv_leak_report(engine)) is not None
    ]
    if problems:
        pytest.fail("KV block leak after the test:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def make_engine(tiny_model: Callable[..., Path]) -> EngineFactory:
    """``make_engine(family="llama", **engine_config)``: a float32 engine over a tiny
    model, with a small explicit KV cache (the default sizes it to 1 GiB)."""

    def make(family: str = "llama", *, model_dir: Path | None = None, **config: Any) -> LLMEngine:
        settings: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 256, "block_size": 16}
        settings.update(config)
        return LLMEngine.from_dir(
            model_dir or tiny_model(family), config=EngineConfig(**settings), model_name=family
        )

    return make


@pytest.fixture
def copy_model(tiny_model: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """``copy_model(family="llama") -> a private copy of the tiny model dir`` to edit."""

    def copy(family: str = "llama") -> Path:
        dst = tmp_path / f"{family}-copy"
        shutil.copytree(tiny_model(family), dst)
        return dst

    return copy


@pytest.fixture
def packing_dtype() -> str:
    """A compute dtype this CPU packs matrices in (bf16 where oneDNN computes it, else
    float32); skips the test where oneDNN packs neither."""
    from ember_functions.linear import Linear

    for dtype in (torch.bfloat16, torch.float32):
        if Linear(device=torch.device("cpu"), dtype=dtype).packs:
            return str(dtype).removeprefix("torch.")
    pytest.skip("this torch build cannot pack matrices (no oneDNN)")


@pytest.fixture
def host_catalog(tmp_path: Path) -> Iterator[ModelCatalog]:
    """A home whose store has a 256 MiB host tier (RAM, outside the home: removed after)."""
    catalog = ModelCatalog(tmp_path, host_cache_bytes=256 << 20)
    yield catalog
    shutil.rmtree(catalog.host_cache_root, ignore_errors=True)


@pytest.fixture
def host_model() -> HostModelFactory:
    """Loads a model directory into host RAM through a catalog's store, importing it into
    the store the first time, as a worker's HOST climb does."""

    def make(catalog: ModelCatalog, model_dir: Path) -> HostModel:
        store = catalog.store()
        try:
            store.manifest(model_dir.name)
        except NotFoundError:
            store.import_hf_dir(model_dir, model_id=model_dir.name)
        return HostModel.from_store(store, model_dir.name, tokenizer_cache=catalog.home / "tok")

    return make

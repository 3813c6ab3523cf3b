"""Building an engine for a model name the way every entry point does (``ember generate``,
``ember chat``, ``ember serve``): install a known model on first use, and load installed
models through the weights store, as workers do; a model directory loads directly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ember_functions.engine import LLMEngine
    from ember_functions.engine_config import EngineConfig
    from ember_weights_store import ModelCatalog

__all__ = ["load_engine", "resolve_model_dir"]


def resolve_model_dir(catalog: ModelCatalog, name: str, *, err: TextIO) -> Path:
    """``name``'s directory; a known model that is not installed yet is installed."""
    from ember_weights_store import find_known_model

    known = None if Path(name).is_dir() else find_known_model(name)
    if known is not None and not catalog.is_installed(known.name):
        print(f"first run: installing {known.name} into {catalog.models_dir}", file=err)
        return Path(catalog.add(known.name, progress=True))
    return Path(catalog.resolve(name))


def load_engine(
    catalog: ModelCatalog, name: str, config: EngineConfig, *, err: TextIO
) -> LLMEngine:
    from ember_functions.engine import LLMEngine

    model_dir = resolve_model_dir(catalog, name, err=err)
    t0 = time.perf_counter()
    in_store = model_dir.parent == catalog.models_dir
    if in_store:
        catalog.ensure_in_store(model_dir.name)
        engine = LLMEngine.from_store(
            catalog.store(),
            model_dir.name,
            config=config,
            tokenizer_cache=catalog.home / "tokenizers",
        )
    else:
        engine = LLMEngine.from_dir(model_dir, config=config, model_name=model_dir.name)
    source = "the weights store" if in_store else str(model_dir)
    print(
        f"loaded {model_dir.name} from {source} in {time.perf_counter() - t0:.2f} s "
        f"(compute {str(engine.model.dtype).removeprefix('torch.')})",
        file=err,
    )
    return engine

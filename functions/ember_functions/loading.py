"""Building an engine for a model name the way every entry point does (``ember generate``,
``ember chat``, ``ember serve``): install a known model on first use, and load installed
models through the weights store, as workers do; a model directory loads directly."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ember_core import ConfigError

if TYPE_CHECKING:
    from ember_functions.engine import LLMEngine
    from ember_functions.engine_config import EngineConfig
    from ember_functions.host_model import HostModel
    from ember_functions.tokenizer import Tokenizer
    from ember_weights_store import ModelCatalog
    from ember_weights_store.manifest import Manifest
    from ember_weights_store.tiers import Tier
    from ember_weights_store.verified import Readahead, VerifiedCopies

__all__ = ["StoreConfig", "WeightsSource", "load_engine", "load_host", "resolve_model_dir"]

# Under a home: tokenizers written from the store, one directory per content
# (``ember_weights_store.tokenizer_files``).
TOKENIZER_CACHE = "tokenizers"


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Where a worker's weights come from, nearest tier first: host RAM (shared by the
    machine's workers; 0 turns it off), a disk cache of decoded chunks, then the origin:
    the home's bucket, or ``s3://bucket/prefix`` at ``endpoint_url``. ``host_chunks=False``
    keeps the chunks out of host RAM where a disk tier holds them: workers share the disk
    tier's page cache instead, and host RAM holds only their packed and bound copies (see
    ``ModelCatalog.store``).

    Example::

        StoreConfig(host_cache_bytes=2 << 30, origin="s3://models/ember")
    """

    host_cache_bytes: int = 0
    host_chunks: bool = True
    disk_cache_bytes: int = 20 << 30
    origin: str = ""  # "": the home's bucket
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host_chunks, bool):
            raise ConfigError(f"host_chunks must be true or false, got {self.host_chunks!r}")
        if self.origin and not self.origin.startswith("s3://"):
            raise ConfigError(
                f"origin must be empty (the home's bucket) or s3://bucket/prefix, "
                f"got {self.origin!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown store setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def catalog(self, home: Path) -> ModelCatalog:
        from ember_weights_store import ModelCatalog

        return ModelCatalog(
            home,
            disk_cache_bytes=self.disk_cache_bytes,
            host_cache_bytes=self.host_cache_bytes,
            host_chunks=self.host_chunks,
        )

    def origin_tier(self) -> Tier | None:
        if not self.origin:
            return None
        from ember_weights_store.s3_tier import S3Tier

        bucket, _, prefix = self.origin.removeprefix("s3://").partition("/")
        return S3Tier(bucket=bucket, prefix=prefix, endpoint_url=self.endpoint_url)

    def origin_raw_size_bytes(self, model: str) -> int:
        """The decoded size of ``model``'s weights in the origin, from its manifest: a
        clear error, before any worker starts, where the model is not there or the
        origin cannot be read."""
        from ember_core import EmberError, NotFoundError
        from ember_weights_store import WeightsStore

        tier = self.origin_tier()
        if tier is None:
            raise ConfigError("this store has no origin; set origin to s3://bucket/prefix")
        try:
            manifest = WeightsStore([tier]).manifest(model)
        except NotFoundError:
            raise ConfigError(
                f"{model!r} is not in {self.origin}; push it there first: "
                f"`ember models push {model} {self.origin}`"
            ) from None
        except EmberError as exc:  # unreachable, no such bucket, no credentials...
            raise ConfigError(f"cannot read {model!r} from {self.origin}: {exc.message}") from None
        return manifest.raw_size_bytes


@dataclass(frozen=True)
class WeightsSource:
    """Where a worker's weights come from: a model name in a home, through a store.

    Example::

        WeightsSource(home, "smollm2-135m", StoreConfig()).read_ahead()
    """

    home: Path
    model: str
    store: StoreConfig

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a zygote's ``prepare`` message carries (see :meth:`from_dict`)."""
        return {
            "home": str(self.home),
            "model": self.model,
            "store": dataclasses.asdict(self.store),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> WeightsSource:
        return cls(
            Path(values["home"]), str(values["model"]), StoreConfig.from_dict(values["store"])
        )

    def read_ahead(
        self, *, on_tokenizer_dir: Callable[[Path], object] | None = None
    ) -> Readahead | None:
        """Brings the model to this machine ahead of the loader (``WeightsStore.readahead``):
        the tokenizer's files written where the loader looks for them, first, and
        ``on_tokenizer_dir`` told where (a new worker's router parses them while torch
        imports); then chunks in a local tier read into the page cache and checked, and
        chunks only in the origin (the home's bucket, or S3) fetched, decoded, checked and
        written into the host tier, where that is the nearest cache tier, for the loader
        to map them (``ember_weights_store.readahead``). What a new worker does while
        torch imports, and a zygote once for all the workers it forks. Returns what it
        did, the manifest it read with it; None for a model loaded straight from its
        directory. Imports no torch, and installs nothing: a known model not installed
        yet is left to the loader."""
        from ember_weights_store.tokenizer_files import tokenizer_dir

        catalog = self.store.catalog(self.home)
        origin = self.store.origin_tier()
        if origin is not None:
            store, model_id = catalog.store(origin=origin), self.model
        else:
            model_dir = catalog.resolve(self.model)
            if not catalog.loads_through_store(model_dir):
                return None
            store, model_id = catalog.store(), model_dir.name
        manifest = store.manifest(model_id)
        written = tokenizer_dir(store, manifest, catalog.home / TOKENIZER_CACHE)
        if on_tokenizer_dir is not None:
            on_tokenizer_dir(written)
        return store.readahead(model_id, manifest=manifest)


def resolve_model_dir(catalog: ModelCatalog, name: str, *, err: TextIO) -> Path:
    """``name``'s directory; a known model that is not installed yet is installed."""
    from ember_weights_store import find_known_model

    known = None if Path(name).is_dir() else find_known_model(name)
    if known is not None and not catalog.is_installed(known.name):
        print(f"first run: installing {known.name} into {catalog.models_dir}", file=err)
        return Path(catalog.add(known.name, progress=True))
    return Path(catalog.resolve(name))


def load_engine(
    catalog: ModelCatalog,
    name: str,
    config: EngineConfig,
    *,
    err: TextIO,
    origin: Tier | None = None,
) -> LLMEngine:
    """``name`` loaded through the catalog's store; with ``origin`` (an object store
    holding the model, e.g. S3), straight from the store: nothing is installed locally."""
    from ember_functions.engine import LLMEngine

    if origin is not None:
        t0 = time.perf_counter()
        engine = LLMEngine.from_store(
            catalog.store(origin=origin),
            name,
            config=config,
            tokenizer_cache=catalog.home / TOKENIZER_CACHE,
        )
        print(f"loaded {name} from {origin} in {time.perf_counter() - t0:.2f} s", file=err)
        return engine

    model_dir = resolve_model_dir(catalog, name, err=err)
    t0 = time.perf_counter()
    in_store = catalog.loads_through_store(model_dir)
    if in_store:
        catalog.ensure_in_store(model_dir.name)
        engine = LLMEngine.from_store(
            catalog.store(),
            model_dir.name,
            config=config,
            tokenizer_cache=catalog.home / TOKENIZER_CACHE,
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


def load_host(
    catalog: ModelCatalog,
    name: str,
    *,
    err: TextIO,
    origin: Tier | None = None,
    tokenizers: Mapping[str, Tokenizer] | None = None,
    on_tokenizer_dir: Callable[[Path], object] | None = None,
    decode_first: bool = False,
    verified: VerifiedCopies | None = None,
    manifest: Manifest | None = None,
) -> HostModel:
    """``name``'s weights, tokenizer and architecture in host RAM, not bound (a worker's
    HOST warmth), from where ``load_engine`` would load them; ``LLMEngine.from_host``
    binds them. ``tokenizers`` (directory -> parsed) are used instead of parsing again;
    ``on_tokenizer_dir`` hears where the tokenizer is as soon as that is known;
    ``decode_first``: see ``Tokenizer.from_dir`` (a worker, given prompts as ids);
    ``verified``, ``manifest``: chunk files checked and the manifest read already (by
    this worker's readahead), for a model loaded through the store."""
    from ember_functions.host_model import HostModel

    cache = catalog.home / TOKENIZER_CACHE
    if origin is not None:
        store, model_id = catalog.store(origin=origin), name
    else:
        model_dir = resolve_model_dir(catalog, name, err=err)
        if not catalog.loads_through_store(model_dir):
            return HostModel.from_dir(
                model_dir, tokenizers=tokenizers, on_tokenizer_dir=on_tokenizer_dir
            )
        catalog.ensure_in_store(model_dir.name)
        store, model_id = catalog.store(), model_dir.name
    return HostModel.from_store(
        store,
        model_id,
        tokenizer_cache=cache,
        tokenizers=tokenizers,
        on_tokenizer_dir=on_tokenizer_dir,
        decode_first=decode_first,
        verified=verified,
        manifest=manifest,
    )

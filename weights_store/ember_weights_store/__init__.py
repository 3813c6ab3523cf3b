"""Chunked, content-addressed model weights: catalog, GGUF importer, manifest, layout,
codecs, the loader and the storage tiers.

Names are exported lazily (PEP 562): ``from ember_weights_store import Manifest`` imports
the manifest module alone. A worker reads its manifest and starts its disk reads while
torch is still importing on another thread (``readahead``), so nothing on that path may
import torch; the loader, the importers and the catalog's GGUF conversion do, when used.
S3Tier lives in ``ember_weights_store.s3_tier``, imported only where used: boto3 costs a
worker's cold start time it does not need when its weights are local.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember_weights_store.bucket_tier import LocalBucketTier
    from ember_weights_store.catalog import (
        KNOWN_MODELS,
        KnownModel,
        ModelCatalog,
        default_home,
        find_known_model,
        validate_model_name,
    )
    from ember_weights_store.codecs import (
        CODEC_NAMES,
        MIN_SAVING_FRACTION,
        Codec,
        choose_codec,
        codec_for,
    )
    from ember_weights_store.disk_tier import DiskTier
    from ember_weights_store.gguf_import import convert_gguf_to_hf
    from ember_weights_store.host_tier import HostTier, HostTierFullError
    from ember_weights_store.layout import chunk_ranges, plan_chunks
    from ember_weights_store.load_job import LoadReport
    from ember_weights_store.loader import LoadedWeights, load
    from ember_weights_store.manifest import (
        DEFAULT_CHUNK_SIZE_BYTES,
        DTYPE_SIZES,
        SCHEMA_VERSION,
        ChunkEntry,
        Manifest,
        TensorEntry,
        model_key,
        validate_model_id,
    )
    from ember_weights_store.model_download import ModelDownloadError
    from ember_weights_store.store import ImportReport, WeightsStore
    from ember_weights_store.tiers import (
        ObjectNotFoundError,
        ObjectTooLargeError,
        Tier,
        TierUsage,
    )

_EXPORTS = {
    "KNOWN_MODELS": "ember_weights_store.catalog",
    "KnownModel": "ember_weights_store.catalog",
    "ModelCatalog": "ember_weights_store.catalog",
    "ModelDownloadError": "ember_weights_store.model_download",
    "default_home": "ember_weights_store.catalog",
    "find_known_model": "ember_weights_store.catalog",
    "validate_model_name": "ember_weights_store.catalog",
    "CODEC_NAMES": "ember_weights_store.codecs",
    "MIN_SAVING_FRACTION": "ember_weights_store.codecs",
    "Codec": "ember_weights_store.codecs",
    "choose_codec": "ember_weights_store.codecs",
    "codec_for": "ember_weights_store.codecs",
    "convert_gguf_to_hf": "ember_weights_store.gguf_import",
    "HostTier": "ember_weights_store.host_tier",
    "HostTierFullError": "ember_weights_store.host_tier",
    "chunk_ranges": "ember_weights_store.layout",
    "plan_chunks": "ember_weights_store.layout",
    "LoadedWeights": "ember_weights_store.loader",
    "LoadReport": "ember_weights_store.load_job",
    "load": "ember_weights_store.loader",
    "DEFAULT_CHUNK_SIZE_BYTES": "ember_weights_store.manifest",
    "DTYPE_SIZES": "ember_weights_store.manifest",
    "SCHEMA_VERSION": "ember_weights_store.manifest",
    "ChunkEntry": "ember_weights_store.manifest",
    "Manifest": "ember_weights_store.manifest",
    "TensorEntry": "ember_weights_store.manifest",
    "model_key": "ember_weights_store.manifest",
    "validate_model_id": "ember_weights_store.manifest",
    "ImportReport": "ember_weights_store.store",
    "WeightsStore": "ember_weights_store.store",
    "DiskTier": "ember_weights_store.disk_tier",
    "LocalBucketTier": "ember_weights_store.bucket_tier",
    "ObjectNotFoundError": "ember_weights_store.tiers",
    "ObjectTooLargeError": "ember_weights_store.tiers",
    "Tier": "ember_weights_store.tiers",
    "TierUsage": "ember_weights_store.tiers",
}

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_CHUNK_SIZE_BYTES",
    "DTYPE_SIZES",
    "KNOWN_MODELS",
    "MIN_SAVING_FRACTION",
    "SCHEMA_VERSION",
    "ChunkEntry",
    "Codec",
    "DiskTier",
    "HostTier",
    "HostTierFullError",
    "ImportReport",
    "KnownModel",
    "LoadReport",
    "LoadedWeights",
    "LocalBucketTier",
    "Manifest",
    "ModelCatalog",
    "ModelDownloadError",
    "ObjectNotFoundError",
    "ObjectTooLargeError",
    "TensorEntry",
    "Tier",
    "TierUsage",
    "WeightsStore",
    "choose_codec",
    "chunk_ranges",
    "codec_for",
    "convert_gguf_to_hf",
    "default_home",
    "find_known_model",
    "load",
    "model_key",
    "plan_chunks",
    "validate_model_id",
    "validate_model_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup skips this function
    return value

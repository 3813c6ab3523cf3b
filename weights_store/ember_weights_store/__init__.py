"""Chunked, content-addressed model weights: catalog, GGUF importer, manifest, layout,
codecs and storage tiers (the loader and the S3 and host tiers come next)."""

from ember_weights_store.catalog import (
    KNOWN_MODELS,
    KnownModel,
    ModelCatalog,
    ModelDownloadError,
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
from ember_weights_store.gguf_import import convert_gguf_to_hf
from ember_weights_store.host_tier import HostTier, HostTierFullError
from ember_weights_store.layout import chunk_ranges, plan_chunks
from ember_weights_store.loader import LoadedWeights, LoadReport, load
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
from ember_weights_store.store import ImportReport, WeightsStore
from ember_weights_store.tiers import (
    DiskTier,
    LocalBucketTier,
    ObjectNotFoundError,
    ObjectTooLargeError,
    Tier,
    TierUsage,
)

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

# S3Tier lives in ember_weights_store.s3_tier, imported only where used: boto3 costs
# a worker's cold start time it does not need when its weights are local.

"""Chunked, content-addressed model weights. Today: the model catalog and the GGUF importer."""

from ember_weights_store.catalog import (
    KNOWN_MODELS,
    KnownModel,
    ModelCatalog,
    ModelDownloadError,
    default_home,
    find_known_model,
    validate_model_name,
)
from ember_weights_store.gguf_import import convert_gguf_to_hf

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "ModelCatalog",
    "ModelDownloadError",
    "convert_gguf_to_hf",
    "default_home",
    "find_known_model",
    "validate_model_name",
]

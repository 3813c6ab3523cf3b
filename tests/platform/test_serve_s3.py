"""`ember serve --weights-origin s3://...`: a pool as at scale, its model pushed to S3 and
nothing installed in the serving home. The first worker brings the model from S3 into the
host tier while it imports torch; the zygote, prepared once it is READY, hands the next
workers its checked chunks and the manifest it read."""

from __future__ import annotations

import io
import shutil
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from ember_core import ConfigError
from ember_platform.cli import main as cli_main
from ember_platform.serve import ServeSettings
from ember_platform.serve_process import free_port, start_serve


def _cli(*argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(list(argv), stdout=out, stderr=err) == 0, err.getvalue()
    return out.getvalue()


def test_weights_origin_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        ServeSettings(weights_origin="/srv/models")
    with pytest.raises(ConfigError, match="weights_origin is not"):
        ServeSettings(weights_endpoint_url="http://127.0.0.1:9000")


def test_a_model_not_in_the_origin_is_refused_before_any_worker_starts(
    tmp_path: Path, s3_endpoint: str
) -> None:
    import boto3

    from ember_platform.serve import build_app

    def serve(origin: str) -> None:
        settings = ServeSettings(
            model="tiny",
            home=str(tmp_path / "home"),
            weights_origin=origin,
            weights_endpoint_url=s3_endpoint,
        )
        build_app(settings, out=io.StringIO())

    # moto keeps its buckets for the whole test process: names no other test uses.
    bucket = f"refused-{uuid.uuid4().hex[:12]}"
    with pytest.raises(ConfigError, match=f"cannot read 'tiny' from s3://{bucket}/team"):
        serve(f"s3://{bucket}/team")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    with pytest.raises(ConfigError, match=f"ember models push tiny s3://{bucket}/team"):
        serve(f"s3://{bucket}/team")


@pytest.mark.slow
def test_a_pool_serves_a_model_pushed_to_s3_with_nothing_installed(
    pushed_tiny: str,
    tmp_path: Path,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ember_weights_store import ModelCatalog

    url = pushed_tiny

    home = tmp_path / "serving"
    monkeypatch.setenv("EMBER_SERVE_POOL_BUFFER", "1")  # a second worker, forked once prepared
    server = start_serve(
        home,
        port=free_port(),
        args=[
            *("--model", "tiny", "--threads", "1", "--max-workers", "2"),
            *("--weights-origin", url, "--weights-endpoint-url", s3_endpoint),
            *("--log-level", "warning"),
        ],
    )
    try:
        assert "the weights fetched from the origin are kept there too" in server.log
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.key)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}
        )
        rows: list[dict[str, object]] = []
        for _ in range(600):  # the buffer worker starts after the first is READY
            rows = http.get("/workers").json()["data"]
            if sum(r["state"] in ("READY", "BUSY") for r in rows) == 2:
                break
            time.sleep(0.1)
        first, second = sorted(rows, key=lambda r: str(r["worker_id"]))[:2]
        assert list(first["chunks_by_tier"]) == ["s3"], first  # fetched while importing
        assert list(second["chunks_by_tier"]) == ["host"], second
        phases = second["cold_start"]
        assert isinstance(phases, dict)
        # Checked by the zygote, and loaded with the manifest it read: no GET from S3.
        assert phases["verify_s"] == 0.0 and phases["manifest_s"] < 0.005, phases
        assert not (home / "models").exists()  # nothing installed here
    finally:
        server.stop()
        shutil.rmtree(ModelCatalog(home).host_cache_root, ignore_errors=True)

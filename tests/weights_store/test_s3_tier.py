"""S3Tier against a real S3 HTTP endpoint: moto's server on 127.0.0.1, the real boto3 client.

Nothing here mocks a client call. Where a test needs to count or break requests it hooks
botocore's own event system, so every byte still goes over HTTP to the server.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from ember_core import ConfigError, EmberError, InvalidRequestError
from ember_weights_store.s3_tier import MIN_PART_BYTES, S3Tier
from ember_weights_store.tiers import ObjectNotFoundError, Tier

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="session")
def client(endpoint: str) -> Any:
    return _client(endpoint)


@pytest.fixture
def bucket(client: Any) -> str:
    # moto's state is process-wide: a fresh bucket per test keeps tests independent.
    name = f"ember-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def tier(client: Any, bucket: str) -> S3Tier:
    return S3Tier(bucket=bucket, prefix="weights", client=client)


def _hash_key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_put_get_has_delete_usage(tier: S3Tier, client: Any, bucket: str) -> None:
    assert isinstance(tier, Tier)
    chunk = os.urandom(3000)
    ckey = _hash_key(chunk)
    manifest = b'{"schema": 1}'
    mkey = "manifests/org--name/rev.json"
    assert not tier.has(ckey)
    assert tier.usage().num_objects == 0

    tier.put(ckey, chunk)
    tier.put(mkey, manifest)
    assert tier.has(ckey) and tier.has(mkey)
    assert tier.get(ckey) == chunk
    assert tier.get(mkey) == manifest
    # Same layout as the local tiers, under the prefix.
    digest = ckey.split(":")[1]
    head = client.head_object(Bucket=bucket, Key=f"weights/chunks/sha256/{digest[:2]}/{digest}")
    assert head["ContentLength"] == 3000

    usage = tier.usage()
    assert (usage.num_objects, usage.size_bytes, usage.budget_bytes) == (2, 3000 + 13, None)
    assert sorted(tier.keys()) == sorted([ckey, mkey])

    tier.put(mkey, b"{}")  # overwrite
    assert tier.get(mkey) == b"{}"

    assert tier.delete(ckey) is True
    assert tier.delete(ckey) is False
    assert not tier.has(ckey)
    assert tier.usage().num_objects == 1


def test_get_missing_names_key_and_tier(tier: S3Tier) -> None:
    key = "manifests/org--name/missing.json"
    with pytest.raises(ObjectNotFoundError) as info:
        tier.get(key)
    assert info.value.key == key and info.value.tier == "s3"
    assert key in str(info.value)
    with pytest.raises(ObjectNotFoundError):
        tier.get_range(key, 0, 10)
    with pytest.raises(ObjectNotFoundError):
        tier.get_range(key, 0, 0)


def test_ranged_gets(tier: S3Tier) -> None:
    data = os.urandom(1000)
    key = _hash_key(data)
    tier.put(key, data)
    for start, length in [(0, 1), (0, 1000), (10, 100), (999, 1), (123, 456)]:
        assert tier.get_range(key, start, length) == data[start : start + length]
    assert tier.get_range(key, 500, 0) == b""
    assert tier.get_range(key, 1000, 0) == b""  # empty range at the very end is in bounds

    # Strict like the other tiers: clamped (990+20), unsatisfiable (1000+1, 2000+5) and
    # negative ranges are refused, never returned short.
    for start, length in [(990, 20), (1000, 1), (2000, 5), (1001, 0), (-1, 5), (0, -1)]:
        with pytest.raises(InvalidRequestError) as info:
            tier.get_range(key, start, length)
        assert key in str(info.value)


def test_multipart_upload_reads_back_identical(client: Any, bucket: str) -> None:
    tier = S3Tier(
        bucket=bucket,
        client=client,
        multipart_threshold_bytes=MIN_PART_BYTES + 1,
        multipart_part_bytes=MIN_PART_BYTES,
    )
    data = os.urandom(11 * MiB)  # parts of 5 + 5 + 1 MiB
    key = _hash_key(data)
    tier.put(key, data)
    assert tier.get(key) == data
    head = client.head_object(Bucket=bucket, Key=tier.object_name(key))
    # A multipart object's ETag is md5-of-part-md5s with a "-<parts>" suffix.
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)
    # A range across the first part boundary.
    start = MIN_PART_BYTES - 100
    assert tier.get_range(key, start, 300) == data[start : start + 300]

    # Exactly at the threshold's edge: one byte below stays a single PUT.
    small = os.urandom(MIN_PART_BYTES)
    skey = _hash_key(small)
    tier.put(skey, small)
    etag = client.head_object(Bucket=bucket, Key=tier.object_name(skey))["ETag"].strip('"')
    assert "-" not in etag
    assert tier.get(skey) == small


def test_failed_multipart_upload_is_aborted(endpoint: str, bucket: str) -> None:
    client = _client(endpoint)
    tier = S3Tier(
        bucket=bucket,
        client=client,
        multipart_threshold_bytes=MIN_PART_BYTES + 1,
        multipart_part_bytes=MIN_PART_BYTES,
    )
    calls = {"parts": 0}

    def fail_second_part(**_: Any) -> None:
        calls["parts"] += 1
        if calls["parts"] == 2:
            raise ConnectionResetError("simulated network drop")

    aborted: list[str] = []
    client.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    client.meta.events.register(
        "before-parameter-build.s3.AbortMultipartUpload",
        lambda params, **_: aborted.append(params["Key"]),
    )
    data = os.urandom(11 * MiB)
    key = _hash_key(data)
    with pytest.raises(ConnectionResetError):
        tier.put(key, data)
    assert aborted == [tier.object_name(key)]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not tier.has(key)


def test_prefix_isolation(client: Any, bucket: str) -> None:
    # 'a' is a string prefix of 'ab': the tier must still not see the other's objects.
    a = S3Tier(bucket=bucket, prefix="a", client=client, name="a")
    b = S3Tier(bucket=bucket, prefix="ab/", client=client, name="b")
    key = "manifests/org--name/rev.json"
    a.put(key, b"from a")
    b.put(key, b"from b, longer")
    b.put("manifests/only-b.json", b"b")
    assert a.get(key) == b"from a"
    assert b.get(key) == b"from b, longer"
    assert not a.has("manifests/only-b.json")
    with pytest.raises(ObjectNotFoundError):
        a.get("manifests/only-b.json")
    assert (a.usage().num_objects, a.usage().size_bytes) == (1, 6)
    assert (b.usage().num_objects, b.usage().size_bytes) == (2, 15)
    # A foreign object under the prefix whose name maps to no key is not counted.
    client.put_object(Bucket=bucket, Key="a/.tmp-junk", Body=b"x")
    assert a.usage().num_objects == 1
    assert a.delete(key) is True
    assert b.get(key) == b"from b, longer"


def test_bad_keys_rejected_before_any_request(endpoint: str, bucket: str) -> None:
    client = _client(endpoint)
    sent: list[str] = []
    client.meta.events.register("before-send.s3.*", lambda request, **_: sent.append(request.url))
    tier = S3Tier(bucket=bucket, client=client)
    bad = ["", "../escape", "/abs", "a//b", ".hidden", "sha256:ABC", "chunks/x", "a\\b", "é"]
    calls: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (tier.has, ()),
        (tier.get, ()),
        (tier.get_range, (0, 1)),
        (tier.put, (b"x",)),
        (tier.delete, ()),
    ]
    for key in bad:
        for method, args in calls:
            with pytest.raises(InvalidRequestError):
                method(key, *args)
    assert sent == []
    tier.put("ok", b"x")  # the hook does see real requests
    assert sent


def test_wrong_bucket_gives_clear_error(client: Any) -> None:
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    tier = S3Tier(bucket=missing, client=client)
    for call in (
        lambda: tier.has("manifests/x.json"),
        lambda: tier.get("manifests/x.json"),
        lambda: tier.put("manifests/x.json", b"x"),
        lambda: tier.delete("manifests/x.json"),
        tier.usage,
    ):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert missing in message and "bucket" in message


def test_unreachable_endpoint_is_an_ember_error() -> None:
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    tier = S3Tier(bucket="b", client=client)
    with pytest.raises(EmberError) as info:
        tier.has("manifests/x.json")
    assert "endpoint" in str(info.value) and info.value.retryable


def test_builds_its_own_client_from_endpoint_url(
    endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    tier = S3Tier(bucket=bucket, prefix="own", endpoint_url=endpoint)
    tier.put("manifests/x.json", b"hello")
    assert tier.get_range("manifests/x.json", 1, 3) == b"ell"


def test_rejects_parts_s3_would_refuse(client: Any) -> None:
    with pytest.raises(InvalidRequestError, match="5 MiB"):
        S3Tier(bucket="b", client=client, multipart_part_bytes=MIN_PART_BYTES - 1)
    with pytest.raises(InvalidRequestError, match="bucket"):
        S3Tier(bucket="b/sub", client=client)


def _logits(engine: Any, ids: list[int]) -> Any:
    import torch

    from ember_functions.attention import AttentionBatch, PrefillChunk

    n = len(ids)
    batch = AttentionBatch(
        slot_mapping=torch.arange(n),
        num_decodes=0,
        decode_slots=None,
        decode_mask=None,
        prefills=[PrefillChunk(0, n, None, None)],
    )
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(ids), torch.arange(n), engine.kv_cache, batch)
        return engine.model.logits(hidden)


def test_import_push_drop_local_tiers_load_gives_identical_logits(
    client: Any, bucket: str, tiny_model: Callable[..., Any], tmp_path: Any
) -> None:
    """The issue's end-to-end path: import into the object store over HTTP, start from
    empty local tiers, load cold from S3: same logits; the next load comes from host RAM.
    (Multipart uploads are covered above: these chunks are below S3's 5 MiB part size.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from ember_functions.engine import LLMEngine
    from ember_functions.engine_config import EngineConfig
    from ember_weights_store import DiskTier, WeightsStore
    from ember_weights_store.host_tier import HostTier

    model_dir = tiny_model("qwen2")
    s3 = S3Tier(
        bucket=bucket,
        prefix="models",
        client=client,
        multipart_threshold_bytes=MIN_PART_BYTES,
        multipart_part_bytes=MIN_PART_BYTES,
    )
    report = WeightsStore([s3]).import_hf_dir(
        model_dir, model_id="acme/tiny", chunk_size_bytes=64 * 1024
    )
    assert report.num_chunks > 1
    shm = tmp_path / "shm"  # a plain directory stands in for /dev/shm here
    fresh = WeightsStore(
        [
            HostTier(shm, budget_bytes=64 * MiB),
            DiskTier(tmp_path / "disk", budget_bytes=64 * MiB),
            s3,
        ]
    )
    config = EngineConfig(dtype="float32", num_kv_blocks=8)
    cold = LLMEngine.from_store(fresh, "acme/tiny", config=config, tokenizer_cache=tmp_path / "t")
    assert cold.load_report is not None
    assert cold.load_report.chunks_by_tier == {"s3": report.num_chunks}
    direct = LLMEngine.from_dir(model_dir, config=config)
    ids = list(range(5, 45))
    ours = _logits(cold, ids)
    assert torch.equal(ours, _logits(direct, ids))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(
        torch.tensor([ids])
    ).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # The cold load promotes into host RAM on a background thread: let it finish.
    host, keys = fresh.tiers[0], [c.hash for c in fresh.manifest("acme/tiny").chunks]
    deadline = time.monotonic() + 30
    while not all(host.has(k) for k in keys) and time.monotonic() < deadline:
        time.sleep(0.02)
    warm = LLMEngine.from_store(fresh, "acme/tiny", config=config, tokenizer_cache=tmp_path / "t")
    assert warm.load_report is not None
    assert warm.load_report.chunks_by_tier == {"host": report.num_chunks}  # promoted

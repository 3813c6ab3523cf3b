"""The object tier: any S3-compatible endpoint (AWS, MinIO, moto, ...) through boto3.

Objects live at ``prefix + key_to_path(key)``, the same layout as ``LocalBucketTier``, so a
local bucket directory can be synced to a prefix as is. Uploads above a threshold go through
an explicit multipart upload (not boto3's transfer manager), so part sizing and the abort on
failure are ours and testable. Every S3 or network failure surfaces as an ``ember_core`` error
that says what failed and what to check.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ember_core import ConfigError, EmberError, InvalidRequestError
from ember_weights_store.keys import key_to_path, path_to_key, validate_key
from ember_weights_store.tiers import ObjectNotFoundError, TierUsage, check_range

__all__ = ["MIN_PART_BYTES", "ObjectStoreError", "S3Tier"]

MiB = 1024 * 1024
#: S3 rejects multipart parts under 5 MiB (except the last one).
MIN_PART_BYTES = 5 * MiB
#: S3 allows at most 10,000 parts per upload.
_MAX_PARTS = 10_000

# Codes S3-compatible servers use for "this object is not there". HEAD has no body, so a
# missing object (or bucket) only shows up as the bare status code "404".
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_AUTH_CODES = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
}


class ObjectStoreError(EmberError):
    """The S3 endpoint failed or refused a request; the message names the operation."""

    http_status = 502
    error_type = "server_error"
    code = "object_store_error"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        # Throttling, 5xx and dropped connections are worth retrying; auth and bad names not.
        self.retryable = retryable


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(status) if status else ""


def _http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


# Both kinds of failure boto raises: ClientError (the server answered with an error) and
# BotoCoreError (no answer: connection, DNS, credentials, timeouts).
_BOTO_ERRORS: tuple[type[BaseException], ...] = (ClientError, BotoCoreError)


class S3Tier:
    """Objects in one bucket under one prefix of an S3-compatible endpoint; unbounded.

    Keeps no state but the client, so any number of processes may share a bucket and prefix.
    boto3 clients are thread-safe, so one tier serves the loader's parallel fetches.
    """

    holds_decoded = False

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        client: Any | None = None,
        multipart_threshold_bytes: int = 8 * MiB,
        multipart_part_bytes: int = 8 * MiB,
        name: str = "s3",
    ) -> None:
        if not bucket or "/" in bucket:
            raise InvalidRequestError(
                f"S3 bucket name {bucket!r} is empty or contains '/'; pass only the bucket "
                "name and put any folder in prefix=",
                param="bucket",
            )
        if multipart_part_bytes < MIN_PART_BYTES:
            raise InvalidRequestError(
                f"multipart_part_bytes={multipart_part_bytes}; S3 needs parts of at least "
                f"{MIN_PART_BYTES} bytes (5 MiB)",
                param="multipart_part_bytes",
            )
        if multipart_threshold_bytes <= 0:
            raise InvalidRequestError(
                f"multipart_threshold_bytes={multipart_threshold_bytes}; give a positive size",
                param="multipart_threshold_bytes",
            )
        self.name = name
        self.bucket = bucket
        # A trailing '/' keeps prefix 'a' from listing or shadowing prefix 'ab'.
        stripped = prefix.strip("/")
        self.prefix = f"{stripped}/" if stripped else ""
        self.endpoint_url = endpoint_url
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.multipart_part_bytes = multipart_part_bytes
        self._made_client = client
        self._client_lock = threading.Lock()
        # HEAD on a missing bucket is a bare 404, just like a missing object; the first
        # such 404 checks the bucket once so a typo'd bucket is not read as "no object".
        self._bucket_ok = False

    @property
    def _client(self) -> Any:
        # Made at first use, not with the tier: a worker whose readahead child fetched
        # everything it needs never imports boto3 or builds a client (~0.3 s).
        if self._made_client is None:
            with self._client_lock:
                if self._made_client is None:
                    self._made_client = self._make_client(self.endpoint_url)
        return self._made_client

    @staticmethod
    def _make_client(endpoint_url: str | None) -> Any:
        # Imported here: boto3 takes a noticeable time to import and only this path needs it.
        import boto3
        from botocore.config import Config

        config = Config(
            # The loader fetches many chunks at once; the default pool of 10 would queue them.
            max_pool_connections=64,
            # Self-hosted endpoints (MinIO, moto, an IP) rarely resolve bucket subdomains.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": 5},
        )
        return boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def object_name(self, key: str) -> str:
        """The S3 object name for ``key``; raises ``InvalidRequestError`` on a bad key."""
        return self.prefix + key_to_path(validate_key(key))

    # -- errors ----------------------------------------------------------------------------

    def __str__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _where(self) -> str:
        endpoint = self.endpoint_url or "the default AWS endpoint"
        return f"bucket {self.bucket!r} at {endpoint}"

    def _fail(self, op: str, key: str | None, exc: BaseException) -> EmberError:
        """Turns a boto error into an ember_core error that says what to check."""
        code = _error_code(exc)
        what = f"{op} of {key!r}" if key is not None else op
        where = f"tier {self.name!r} ({self._where()})"
        if code in _NO_BUCKET_CODES:
            return self._no_bucket(op, key)
        if code in _AUTH_CODES:
            return ConfigError(
                f"{where}: {what} was refused ({code}); check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE), the region and "
                "that they may read and write this bucket",
                param="bucket",
            )
        if code == "NoCredentialsError" or type(exc).__name__ == "NoCredentialsError":
            return ConfigError(
                f"{where}: {what} failed: no AWS credentials found; set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
            )
        status = _http_status(exc)
        retryable = status >= 500 or status == 429 or not code  # no code: network failure
        return ObjectStoreError(
            f"{where}: {what} failed: {code or type(exc).__name__}: {exc}; check the "
            "endpoint_url is reachable, the credentials and the bucket",
            retryable=retryable,
        )

    def _no_bucket(self, op: str, key: str | None) -> ConfigError:
        what = f"{op} of {key!r}" if key is not None else op
        return ConfigError(
            f"tier {self.name!r} ({self._where()}): {what} failed: the bucket does not exist; "
            "check the bucket name and the endpoint_url, or create the bucket",
            param="bucket",
        )

    def _check_bucket(self, op: str, key: str) -> None:
        if self._bucket_ok:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except _BOTO_ERRORS as exc:
            if _error_code(exc) in _MISSING_CODES | _NO_BUCKET_CODES:
                raise self._no_bucket(op, key) from exc
            raise self._fail(op, key, exc) from exc
        self._bucket_ok = True

    def _head(self, op: str, key: str, name: str) -> int | None:
        """The object's size, or ``None`` if it does not exist (in an existing bucket)."""
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=name)
        except _BOTO_ERRORS as exc:
            if _error_code(exc) in _MISSING_CODES:
                self._check_bucket(op, key)
                return None
            raise self._fail(op, key, exc) from exc
        self._bucket_ok = True
        return int(resp["ContentLength"])

    # -- Tier protocol ---------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return self._head("has", key, self.object_name(key)) is not None

    def get(self, key: str) -> bytes:
        name = self.object_name(key)
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=name)
            return bytes(resp["Body"].read())
        except _BOTO_ERRORS as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectNotFoundError(key, tier=self.name) from None
            raise self._fail("get", key, exc) from exc

    def size(self, key: str) -> int:
        """The object's size in bytes; raises ``ObjectNotFoundError`` if absent."""
        size = self._head("size", key, self.object_name(key))
        if size is None:
            raise ObjectNotFoundError(key, tier=self.name)
        return size

    def get_range(self, key: str, start: int, length: int) -> bytes:
        name = self.object_name(key)
        if start < 0 or length < 0:
            check_range(key, start, length, 0)  # raises before any request
        if length == 0:
            # HTTP cannot express an empty range, so check existence and bounds with HEAD.
            check_range(key, start, 0, self.size(key))
            return b""
        try:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=name, Range=f"bytes={start}-{start + length - 1}"
            )
        except _BOTO_ERRORS as exc:
            code = _error_code(exc)
            if code in _MISSING_CODES:
                raise ObjectNotFoundError(key, tier=self.name) from None
            if code == "InvalidRange" or _http_status(exc) == 416:
                # Start is at or past the end: report it like the other tiers do.
                check_range(key, start, length, self.size(key))
            raise self._fail("get_range", key, exc) from exc
        body = bytes(resp["Body"].read())
        # S3 clamps a range that runs past the end; the total after '/' tells us the size.
        total = _range_total(resp.get("ContentRange"))
        if total is not None:
            check_range(key, start, length, total)
        if len(body) != length:
            check_range(key, start, length, start + len(body))
            raise ObjectStoreError(
                f"tier {self.name!r}: get_range of {key!r} returned {len(body)} bytes for a "
                f"{length}-byte range; the endpoint ignored or mangled the Range header",
                retryable=True,
            )
        return body

    def put(self, key: str, data: bytes) -> None:
        name = self.object_name(key)
        if len(data) < self.multipart_threshold_bytes:
            try:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data))
            except _BOTO_ERRORS as exc:
                raise self._fail("put", key, exc) from exc
        else:
            self._put_multipart(key, name, data)
        self._bucket_ok = True

    def _part_size(self, total: int) -> int:
        # Grow parts for huge objects so they still fit in S3's 10,000-part limit.
        return max(self.multipart_part_bytes, -(-total // _MAX_PARTS))

    def _put_multipart(self, key: str, name: str, data: bytes) -> None:
        try:
            upload = self._client.create_multipart_upload(Bucket=self.bucket, Key=name)
        except _BOTO_ERRORS as exc:
            raise self._fail("multipart put (create)", key, exc) from exc
        upload_id = upload["UploadId"]
        view = memoryview(data)
        part_size = self._part_size(len(view))
        try:
            parts = []
            for number, offset in enumerate(range(0, len(view), part_size), start=1):
                resp = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[offset : offset + part_size]),
                )
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            # Uploaded parts are billed storage until aborted, and invisible to usage().
            # If the abort fails too, the original failure is the one worth reporting.
            with contextlib.suppress(*_BOTO_ERRORS):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id
                )
            if isinstance(exc, _BOTO_ERRORS):
                raise self._fail("multipart put", key, exc) from exc
            raise

    def delete(self, key: str) -> bool:
        name = self.object_name(key)
        # DeleteObject succeeds on missing objects, so HEAD first to report whether it existed.
        if self._head("delete", key, name) is None:
            return False
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except _BOTO_ERRORS as exc:
            raise self._fail("delete", key, exc) from exc
        return True

    def keys(self) -> list[str]:
        """Every key under the prefix (objects whose names map to no key are skipped)."""
        return [key for key, _ in self._list()]

    def _list(self) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = path_to_key(obj["Key"][len(self.prefix) :])
                    if key is not None:  # foreign objects sharing the prefix are not ours
                        found.append((key, int(obj["Size"])))
        except _BOTO_ERRORS as exc:
            raise self._fail("list", None, exc) from exc
        self._bucket_ok = True
        return found

    def usage(self) -> TierUsage:
        # Listed every time: the bucket is shared, so no process can keep a running total.
        objects = self._list()
        return TierUsage(
            num_objects=len(objects),
            size_bytes=sum(size for _, size in objects),
            budget_bytes=None,
        )


def _range_total(content_range: str | None) -> int | None:
    # "bytes 0-99/1234" -> 1234; "*" means the server does not know.
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None

"""Storage in an S3 (or S3-compatible) bucket."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import add_expect_header

from storage.base import StorageError, StorageRefused, safe_key

_MiB = 1024 * 1024
# Errors no retry mends: the credentials, their rights or the bucket must change.
REFUSALS = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "NoSuchBucket", "InvalidBucketName",
})
# Objects above 8 MiB go multipart: parts upload in parallel and a failed part
# is retried alone instead of restarting the whole object.
_TRANSFER = TransferConfig(
    multipart_threshold=8 * _MiB, multipart_chunksize=8 * _MiB, max_concurrency=4
)


class S3Storage:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        sse: str | None = None,
        max_attempts: int = 10,
        connect_timeout: float = 5,
        read_timeout: float = 60,
    ) -> None:
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        if self._prefix:
            safe_key(self._prefix)
        self._sse = sse
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            # Per attempt; read_timeout bounds each wait for bytes, not the whole transfer.
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # botocore still presigns with SigV2 in some regions; SigV4 works everywhere.
            signature_version="s3v4",
        )
        # A private Session: boto3's default session is not thread-safe to create
        # clients from, whereas the client itself can be shared by all threads.
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=config
        )
        # botocore sends every upload with "Expect: 100-continue": a second round trip per
        # object, to spare sending a body the server would refuse. Ours are small (a WAV,
        # a job's record), and each job stores two: at 50 ms per round trip that waiting
        # showed in the pipeline's throughput (docs/PERF.md).
        self._client.meta.events.unregister("before-call.s3", add_expect_header)

    @property
    def base_url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        name = self._name(key)
        extra: dict[str, Any] = self._extra_args(content_type)
        if metadata:
            extra["Metadata"] = dict(metadata)
        with self._errors("upload", name):
            self._client.upload_fileobj(
                io.BytesIO(data),
                self._bucket,
                name,
                ExtraArgs=extra,
                Config=_TRANSFER,
            )
        return self._url(name)

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)
        with self._errors("download", name):
            body = self._client.get_object(Bucket=self._bucket, Key=name)["Body"]
            with body:
                return body.read()

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def head(self, key: str) -> dict[str, str] | None:
        head = self._head(key)
        return None if head is None else dict(head.get("Metadata", {}))

    def url_for(self, key: str) -> str:
        return self._url(self._name(key))

    def presigned_url(self, key: str, expires_s: int) -> str:
        # SigV4 caps a presigned URL at 7 days; the signature is computed locally.
        if not 1 <= expires_s <= 7 * 86400:
            raise ValueError(f"presigned URL lifetime must be 1-604800 seconds, got {expires_s}")
        name = self._name(key)
        with self._errors("presign", name):
            return str(self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": name}, ExpiresIn=expires_s))

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def _head(self, key: str) -> dict[str, Any] | None:
        name = self._name(key)
        with self._errors("head", name):
            try:
                head: dict[str, Any] = self._client.head_object(Bucket=self._bucket, Key=name)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise
            return head

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._errors("delete", name):
            self._client.delete_object(Bucket=self._bucket, Key=name)

    def list_keys(self, prefix: str) -> list[str]:
        name = self._name(prefix.rstrip("/")) + "/"
        skip = len(self._prefix) + 1 if self._prefix else 0
        keys: list[str] = []
        with self._errors("list", name):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=name):
                keys += [obj["Key"][skip:] for obj in page.get("Contents", [])]
        return sorted(keys)

    def _name(self, key: str) -> str:
        return f"{self._prefix}/{safe_key(key)}" if self._prefix else safe_key(key)

    def _url(self, name: str) -> str:
        return f"s3://{self._bucket}/{name}"

    def _extra_args(self, content_type: str) -> dict[str, str]:
        extra = {"ContentType": content_type}
        if self._sse:
            extra["ServerSideEncryption"] = self._sse
        return extra

    @contextmanager
    def _errors(self, operation: str, name: str) -> Iterator[None]:
        # Only the error code/class goes into the message: botocore's own texts
        # can embed endpoint URLs, which may carry userinfo.
        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            code = _error_code(exc)
            kind = StorageRefused if code in REFUSALS else StorageError
            raise kind(f"S3 {operation} of {self._url(name)} failed: {code}", code) from exc


def _error_code(exc: BaseException) -> str:
    # boto3's upload_file re-raises ClientError as S3UploadFailedError with the
    # original only as implicit context, so look one level down for the code.
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, ClientError):
            return str(candidate.response.get("Error", {}).get("Code", "Unknown"))
    return type(exc).__name__

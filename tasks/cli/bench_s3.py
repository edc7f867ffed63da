"""The S3 side of `ttspool bench --pipeline`, `--footprint` and `--soak`: a bucket and
prefix of the run's own (moto's server, or the endpoint the settings name), a client for
it, and that bucket as the producer reads it."""

from __future__ import annotations

import logging
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..settings import Settings

# moto accepts any credentials; these reach only the worker this command starts.
_MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ttspool-bench", "AWS_SECRET_ACCESS_KEY": "ttspool-bench",
                     "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Bucket:
    endpoint: str  # http://host:port, what the proxy forwards to
    bucket: str
    prefix: str  # this run's own: cleared between passes, and at the end
    credentials: dict[str, str]  # for the worker's environment and our own client; empty: boto3's chain


def _upstream(settings: Settings) -> str | None:
    """The S3 endpoint the settings name for the bench, or None (use moto)."""
    if not settings.storage_url.startswith("s3://") or not settings.s3_endpoint_url:
        return None
    if not settings.s3_endpoint_url.startswith("http://"):
        # The proxy forwards bytes: a TLS endpoint's certificate would not match 127.0.0.1.
        raise UsageError("--pipeline forwards storage through a local delay proxy and needs a plain http:// "
                         f"TTSPOOL_S3_ENDPOINT_URL, got {settings.s3_endpoint_url.split('://')[0]}://")
    return settings.s3_endpoint_url.rstrip("/")


def check_storage(settings: Settings) -> None:
    """UsageError (exit 2) before any work when there is no S3 endpoint to use."""
    if _upstream(settings) is not None:
        return
    try:
        import moto.server  # noqa: F401 - only whether it imports
    except ImportError:
        raise UsageError("--pipeline needs an S3 endpoint: install the test extra (pip install 'ttspool[test]', "
                         "for moto's server), or name one with TTSPOOL_STORAGE_URL=s3://bucket/prefix and "
                         "TTSPOOL_S3_ENDPOINT_URL=http://host:port") from None


def start_s3(settings: Settings, stack: ExitStack) -> Bucket:
    """This run's bucket and prefix: at the endpoint the settings name, or in a moto
    server stopped with `stack`."""
    upstream = _upstream(settings)
    run = f"ttspool-bench-{uuid.uuid4().hex[:8]}"
    if upstream is not None:
        bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
        return Bucket(upstream, bucket, "/".join(p for p in (prefix.strip("/"), run) if p), {})
    from moto.server import ThreadedMotoServer

    # Its HTTP server logs every request on stderr, between the bench's own lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stack.callback(server.stop)
    host, port = server.get_host_and_port()
    found = Bucket(f"http://{host}:{port}", "ttspool-bench", run, _MOTO_CREDENTIALS)
    client = s3_client(found)
    try:
        client.create_bucket(Bucket=found.bucket)
    finally:
        client.close()  # a kept-alive connection would hold one of moto's threads
    return found


def s3_client(b: Bucket) -> Any:
    import boto3

    creds = {"aws_access_key_id": b.credentials["AWS_ACCESS_KEY_ID"],
             "aws_secret_access_key": b.credentials["AWS_SECRET_ACCESS_KEY"],
             "region_name": b.credentials["AWS_DEFAULT_REGION"]} if b.credentials else {}
    return boto3.session.Session().client("s3", endpoint_url=b.endpoint, **creds)


class Records:
    """This run's bucket as the producer reads it, with the bucket's own credentials
    (moto's reach only the processes started here, not the default chain)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.client = s3_client(bucket)

    def _name(self, key: str) -> str:
        return f"{self.bucket.prefix}/{key}"

    def exists(self, key: str) -> bool:
        found = self.client.list_objects_v2(Bucket=self.bucket.bucket, Prefix=self._name(key), MaxKeys=1)
        return any(o["Key"] == self._name(key) for o in found.get("Contents", []))

    def get_bytes(self, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=self.bucket.bucket, Key=self._name(key))["Body"].read()
        return data

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.client.put_object(Bucket=self.bucket.bucket, Key=self._name(key), Body=data, ContentType=content_type)
        return f"s3://{self.bucket.bucket}/{self._name(key)}"

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket.bucket, Key=self._name(key))

    def list_keys(self, prefix: str) -> list[str]:
        found = self.client.list_objects_v2(Bucket=self.bucket.bucket, Prefix=self._name(prefix))
        return sorted(o["Key"].removeprefix(self.bucket.prefix + "/") for o in found.get("Contents", []))

    def close(self) -> None:
        self.client.close()

"""The storage interface, key validation and URL-based backend selection."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import SplitResult, unquote, urlsplit

MAX_KEY_LENGTH = 512
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Deliberately loose (no dot/dash adjacency rules): S3 itself has the final say;
# this only rejects things that cannot be bucket names, such as "user:pw@host".
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SSE_VALUES = frozenset({"AES256", "aws:kms", "aws:kms:dsse"})


class StorageError(Exception):
    """A backend failed. Messages name the bucket/key/path, never credentials."""


def safe_key(key: str) -> str:
    """Return `key` unchanged if it is a safe object key, else raise ValueError.

    Every segment must start with an ASCII letter or digit, which rules out
    "..", hidden/temporary names, absolute paths and empty segments, so a key
    can never climb out of the store's prefix.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"storage key is {len(key)} chars; the limit is {MAX_KEY_LENGTH}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"bad storage key {key!r}: segment {segment!r} must match "
                f"[A-Za-z0-9][A-Za-z0-9._-]* (segments are separated by single '/')"
            )
    return key


@runtime_checkable
class Storage(Protocol):
    @property
    def base_url(self) -> str: ...

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> str: ...

    def put_file(
        self, key: str, path: str | Path, content_type: str = "application/octet-stream"
    ) -> str: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def url_for(self, key: str) -> str: ...

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A URL anyone can GET for `expires_s` seconds (a file:// URL for local storage)."""
        ...

    def size(self, key: str) -> int | None: ...

    def delete(self, key: str) -> None:
        """Remove the object; removing one that is not there is not an error."""
        ...


def _redacted(parts: SplitResult) -> str:
    # Storage URLs come from config and may carry "user:password@"; keep that
    # out of error messages, which end up in logs.
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def open_storage(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_max_attempts: int = 10,
) -> Storage:
    """Open `file:///abs/dir` or `s3://bucket[/prefix]`.

    S3 credentials come from boto3's default chain; server-side encryption is
    enabled by setting TTSPOOL_S3_SSE (e.g. AES256 or aws:kms).
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {_redacted(parts)!r} must not have a query or fragment")
    # Backends are imported lazily so that local-only deployments never import
    # boto3, and so that the backend modules can import this one.
    if parts.scheme == "file":
        root = unquote(parts.path)
        if parts.netloc or not root.startswith("/"):
            raise ValueError(
                f"file storage URL {_redacted(parts)!r} must name an absolute "
                "directory, e.g. file:///var/lib/ttspool"
            )
        from storage.local import LocalStorage

        return LocalStorage(Path(root))
    if parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(
                f"S3 storage URL {_redacted(parts)!r} must be s3://bucket[/prefix] "
                "with a valid bucket name"
            )
        sse = os.environ.get("TTSPOOL_S3_SSE") or None
        if sse is not None and sse not in _SSE_VALUES:
            raise ValueError(f"TTSPOOL_S3_SSE must be one of {sorted(_SSE_VALUES)}, got {sse!r}")
        from storage.s3 import S3Storage

        return S3Storage(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            sse=sse,
            max_attempts=s3_max_attempts,
        )
    raise ValueError(
        f"unsupported storage URL {_redacted(parts)!r}: expected file:///abs/dir "
        "or s3://bucket[/prefix]"
    )

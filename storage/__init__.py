"""Object stores (local directory, S3) behind one small interface, chosen by URL."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from storage.base import Storage, StorageError, StorageRefused, safe_key
from tasks.errors import SettingsError
from tasks.settings import SSE_VALUES, Settings, redact_url

# Deliberately loose (no dot/dash adjacency rules): S3 itself has the final say;
# this only rejects things that cannot be bucket names, such as "user:pw@host".
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def open_storage(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    s3_sse: str | None = None,
    s3_max_attempts: int = 10,
    s3_timeouts: tuple[float, float] = (5, 60),
) -> Storage:
    """Open `file:///abs/dir` or `s3://bucket[/prefix]`.

    S3 credentials come from boto3's default chain; `s3_sse` (AES256, aws:kms, ...)
    turns on server-side encryption; `s3_timeouts` are boto3's (connect, read) seconds.
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {redact_url(parts.geturl())!r} must not have a query or fragment")
    # Backends are imported lazily so that local-only deployments never import
    # boto3, and so that the backend modules can import this one.
    if parts.scheme == "file":
        root = unquote(parts.path)
        if parts.netloc or not root.startswith("/"):
            raise ValueError(
                f"file storage URL {redact_url(parts.geturl())!r} must name an absolute "
                "directory, e.g. file:///var/lib/ttspool"
            )
        from storage.local import LocalStorage

        return LocalStorage(Path(root))
    if parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(
                f"S3 storage URL {redact_url(parts.geturl())!r} must be s3://bucket[/prefix] "
                "with a valid bucket name"
            )
        if s3_sse is not None and s3_sse not in SSE_VALUES:
            raise SettingsError(f"TTSPOOL_S3_SSE must be one of {sorted(SSE_VALUES)}, got {s3_sse!r}")
        from storage.s3 import S3Storage

        return S3Storage(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=s3_endpoint_url,
            sse=s3_sse,
            max_attempts=s3_max_attempts,
            connect_timeout=s3_timeouts[0],
            read_timeout=s3_timeouts[1],
        )
    raise ValueError(
        f"unsupported storage URL {redact_url(parts.geturl())!r}: expected file:///abs/dir "
        "or s3://bucket[/prefix]"
    )


def storage_for(settings: Settings, s3_max_attempts: int = 10) -> Storage:
    """The store the settings name (TTSPOOL_STORAGE_URL and its S3 options)."""
    return open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_sse=settings.s3_sse,
                        s3_max_attempts=s3_max_attempts)


__all__ = ["Storage", "StorageError", "StorageRefused", "open_storage", "safe_key", "storage_for"]

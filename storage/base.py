"""The storage interface, its error, and key validation (the backends' common ground)."""

from __future__ import annotations

import re
from typing import Mapping, Protocol, runtime_checkable

from tasks.errors import TtspoolError

MAX_KEY_LENGTH = 512
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StorageError(TtspoolError):
    """A backend failed. Messages name the bucket/key/path, never credentials; `code` is
    the backend's name for the failure (an S3 error code, an errno name), or ""."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class StorageRefused(StorageError):
    """The store refuses for good (no credentials, access denied, no such bucket, a
    folder this user cannot write): retrying does not help; its settings must change."""


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
        self, key: str, data: bytes, content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> str: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def head(self, key: str) -> dict[str, str] | None:
        """The object's metadata as put_bytes was given it ({} from a store that keeps
        none), or None when there is no object."""
        ...

    def url_for(self, key: str) -> str: ...

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A URL anyone can GET for `expires_s` seconds (a file:// URL for local storage)."""
        ...

    def size(self, key: str) -> int | None: ...

    def delete(self, key: str) -> None:
        """Remove the object; removing one that is not there is not an error."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under the folder `prefix` (ending in '/'), sorted; none is not an error."""
        ...

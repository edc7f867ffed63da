"""A finished job's durable record: one JSON object next to the audio in the object store.

The broker's Redis keeps a job's result for `TTSPOOL_RESULT_TTL` only (hours), so its
memory follows the traffic of that window, not the retention of every job ever run.
The worker writes this record before it records the result in Redis (a SUCCESS that
Redis shows always has one), and `Client.status` reads it once Redis has let the job go.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping, Protocol

from .claims import split_task_id
from .states import JobState

RECORDS_PREFIX = "records/"
# Fields of the Redis result kept in the record (the rest are the job's own).
_RESULT_FIELDS = ("url", "key", "duration_s", "sample_rate", "format", "spoken_text", "cached", "voice", "dropped")


class RecordStore(Protocol):
    """What records need of an object store (storage.Storage)."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...


def audio_key(base_url: str, url: str) -> str:
    """A result's storage key, from its URL and the store's base URL: Redis keeps only
    the URL, which is the base URL, '/' and the key."""
    base = base_url.rstrip("/") + "/"
    if not url.startswith(base):
        raise ValueError(f"{url.split('?')[0]!r} is not in the store at {base!r}")
    return url[len(base):]


def record_key(job_id: str) -> str:
    """Keyed by tenant and id (tasks/claims.py): no tenant's record can overwrite another's."""
    tenant, own_id = split_task_id(job_id)
    # A job id may start with '.', '_' or '-', which no storage key segment may; a tenant
    # starts with a letter or digit, and "job-" keeps a tenant's folder apart from ids.
    return f"{RECORDS_PREFIX}{tenant + '/' if tenant is not None else ''}job-{own_id}.json"


def finished(job_id: str, kwargs: Mapping[str, Any] | Any, status: JobState, *,
             result: Mapping[str, Any] | None = None, error: str | None = None,
             started_at: float | None = None) -> dict[str, Any]:
    """The record of a job that ended: how, what was written, with what, and when (Unix)."""
    params = dict(kwargs) if isinstance(kwargs, Mapping) else {"raw": repr(kwargs)[:2048]}
    enqueued = params.pop("enqueued_at", None)
    return {
        "id": job_id,
        "status": status.value,
        **{k: result[k] for k in _RESULT_FIELDS if result is not None and k in result},
        **({"error": error} if error is not None else {}),
        "params": params,
        "enqueued_at": enqueued if isinstance(enqueued, (int, float)) else None,
        "started_at": started_at,
        "finished_at": time.time(),
    }


def write(store: RecordStore, record: Mapping[str, Any]) -> None:
    """Raises the store's error (storage.StorageError) when it cannot be written."""
    data = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()
    store.put_bytes(record_key(record["id"]), data, "application/json")


def read(store: RecordStore, job_id: str) -> dict[str, Any] | None:
    """The job's record, or None when it has none (never finished, or never submitted)."""
    record = _read(store, record_key(job_id))
    tenant, own_id = split_task_id(job_id)
    if record is None and tenant is not None:
        # Before per-tenant ids, a tenant's record sat under its bare id, naming its
        # tenant inside: that tenant's, and only that tenant's.
        legacy = _read(store, record_key(own_id))
        if legacy is not None and legacy.get("params", {}).get("tenant") == tenant:
            return {**legacy, "id": job_id}
    return record


def _read(store: RecordStore, key: str) -> dict[str, Any] | None:
    if not store.exists(key):
        return None
    record: dict[str, Any] = json.loads(store.get_bytes(key))
    return record

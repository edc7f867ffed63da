"""Celery's Redis result backends, minus the fields every result carries empty.

Celery writes `"traceback": null, "children": null` (and `"date_done": null` until a job
ends) into every result it stores; its own readers take all three with `.get()`. Each
result lives in the broker's Redis for the result window, so at millions of jobs a day
those bytes are broker memory (docs/PERF.md, `ttspool bench --footprint`).
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

_ALWAYS = ("status", "result")


class _Compact:
    def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_result_meta(*args, **kwargs)  # type: ignore[misc]
        return {k: v for k, v in meta.items() if v is not None or k in _ALWAYS}


class CompactRedisBackend(_Compact, RedisBackend):
    pass


class CompactSentinelBackend(_Compact, SentinelBackend):
    pass


def backend_url(url: str) -> str:
    """Celery's `result_backend` for `url`: the compact class, then the URL."""
    cls = CompactSentinelBackend if url.startswith("sentinel://") else CompactRedisBackend
    return f"{__name__}:{cls.__name__}+{url}"

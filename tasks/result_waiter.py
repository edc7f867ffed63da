"""Waiting for job results without a thread (or a poll loop) per waiting request.

Celery's Redis result backend PUBLISHes every result on a channel named after its key
as it stores it. One listener task holds one pub/sub connection with one pattern
subscription to every result key (no subscribe and unsubscribe per request, whose
churn is where listeners get stuck), and resolves the futures of the requests that
wait for a key as its result arrives. A request's key is also read once when it starts
waiting (the result may be there already), and every awaited key is read again every
few seconds (messages published while Redis was being reconnected to).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from redis.exceptions import RedisError

from .broker_redis import async_redis_client
from .states import JobState

log = logging.getLogger(__name__)

_TERMINAL = (JobState.SUCCESS, JobState.FAILURE)
_RESYNC_S = 2.0
_TICK_S = 0.05
# While Redis is away: pauses between reconnects grow to _RECONNECT_MAX_S (a result is
# then read at most that late after it is back), and the warnings thin out to one per
# _LOG_MAX_S (a gateway started without Redis must not fill its log twice a second).
_RECONNECT_S = 0.5
_RECONNECT_MAX_S = 5.0
_LOG_MAX_S = 60.0


class ResultWaiter:
    def __init__(self, url: str, master_name: str, key_prefix: str, key_for: Callable[[str], str],
                 decode: Callable[[bytes], dict[str, Any]]) -> None:
        self._redis = async_redis_client(url, master_name, socket_timeout=10, socket_connect_timeout=5)
        self._key_for = key_for
        self._decode = decode
        self._pattern = key_prefix + "*"  # every result key
        self._waiting: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._new: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ttspool-result-waiter")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._redis.aclose()

    async def ping(self, timeout: float = 2.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), timeout))
        except (RedisError, OSError, asyncio.TimeoutError):
            return False

    async def get(self, job_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._key_for(job_id))
        return self._decode(raw) if raw is not None else None

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
        """The job's result meta once it is SUCCESS or FAILURE; TimeoutError after `timeout`."""
        key = self._key_for(job_id)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(fut)
        self._new.add(key)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            futures = self._waiting.get(key, [])
            if fut in futures:
                futures.remove(fut)
            if not futures:
                self._waiting.pop(key, None)

    def _resolve(self, key: str, raw: bytes | None) -> None:
        futures = self._waiting.get(key)
        if raw is None or not futures:
            return
        meta = self._decode(raw)
        if meta.get("status") in _TERMINAL:
            for fut in futures:
                if not fut.done():
                    fut.set_result(meta)

    async def _fetch(self, keys: list[str]) -> None:
        if keys:
            for key, raw in zip(keys, await self._redis.mget(keys)):
                self._resolve(key, raw)

    async def _run(self) -> None:
        pubsub = None
        last_sync = 0.0
        failures, logged_at, log_every = 0, 0.0, 0.0
        while True:
            try:
                if pubsub is None:
                    pubsub = self._redis.pubsub()
                    await pubsub.psubscribe(self._pattern)
                    last_sync = 0.0  # anything stored while nobody listened is read below
                    if failures:
                        log.warning("result listener: reconnected after %d failed tries", failures)
                    failures, log_every = 0, 0.0
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_TICK_S)
                if msg is not None and msg.get("type") == "pmessage":
                    channel = msg["channel"]
                    self._resolve(channel.decode() if isinstance(channel, bytes) else channel, msg["data"])
                if self._new:
                    new, self._new = self._new, set()
                    await self._fetch(sorted(k for k in new if k in self._waiting))
                if time.monotonic() - last_sync > _RESYNC_S:
                    await self._fetch(sorted(self._waiting))
                    last_sync = time.monotonic()
            except asyncio.CancelledError:
                if pubsub is not None:
                    await pubsub.aclose()
                raise
            except (RedisError, OSError) as err:
                # Redis restarting (or not there yet): start over on a new connection; the
                # futures wait on.
                failures += 1
                pause = min(_RECONNECT_MAX_S, _RECONNECT_S * 2 ** min(failures - 1, 16))
                if time.monotonic() - logged_at >= log_every:
                    log.warning("result listener: %s; reconnecting (try %d, next in %.1f s)", err, failures, pause)
                    logged_at = time.monotonic()
                    log_every = min(_LOG_MAX_S, max(1.0, 2 * log_every))
                if pubsub is not None:
                    await pubsub.aclose()
                pubsub = None
                await asyncio.sleep(pause)

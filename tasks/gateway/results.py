"""Waiting for job results without a thread (or a poll loop) per waiting request.

Celery's Redis result backend PUBLISHes every result on a channel named after its key
as it stores it. One listener task owns one pub/sub connection: requests register the
ids they wait for, the listener subscribes, reads back any result that was stored
before the subscription took, and resolves each request's future when its result
arrives. A periodic MGET of every awaited key covers messages lost while Redis was
being reconnected to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..states import JobState

log = logging.getLogger(__name__)

_TERMINAL = (JobState.SUCCESS, JobState.FAILURE)
_RESYNC_S = 2.0


class ResultWaiter:
    def __init__(self, url: str, key_for: Callable[[str], str], decode: Callable[[bytes], dict[str, Any]]) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._key_for = key_for
        self._decode = decode
        self._waiting: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._subscribed: set[str] = set()
        self._wake = asyncio.Event()
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
        self._wake.set()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            futures = self._waiting.get(key, [])
            if fut in futures:
                futures.remove(fut)
            if not futures:
                self._waiting.pop(key, None)
                self._wake.set()

    def _resolve(self, key: str, raw: bytes | None) -> None:
        if raw is None:
            return
        meta = self._decode(raw)
        if meta.get("status") in _TERMINAL:
            for fut in self._waiting.get(key, []):
                if not fut.done():
                    fut.set_result(meta)

    async def _fetch(self, keys: list[str]) -> None:
        if keys:
            for key, raw in zip(keys, await self._redis.mget(keys)):
                self._resolve(key, raw)

    async def _run(self) -> None:
        pubsub = self._redis.pubsub()
        last_sync = 0.0
        while True:
            try:
                wanted = set(self._waiting)
                new, gone = wanted - self._subscribed, self._subscribed - wanted
                if new:
                    await pubsub.subscribe(*new)
                    self._subscribed |= new
                    # A result stored before the subscription took is only in the key.
                    await self._fetch(sorted(new))
                if gone:
                    await pubsub.unsubscribe(*gone)
                    self._subscribed -= gone
                if time.monotonic() - last_sync > _RESYNC_S:
                    await self._fetch(sorted(wanted))
                    last_sync = time.monotonic()
                if not self._subscribed:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), _RESYNC_S)
                    except asyncio.TimeoutError:
                        pass
                    continue
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                if msg is not None and msg.get("type") == "message":
                    channel = msg["channel"]
                    self._resolve(channel.decode() if isinstance(channel, bytes) else channel, msg["data"])
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except (RedisError, OSError) as err:
                # Redis restarting: start over on a new connection; the futures wait on.
                log.warning("result listener: %s; reconnecting", err)
                await pubsub.aclose()
                pubsub = self._redis.pubsub()
                self._subscribed.clear()
                await asyncio.sleep(0.5)

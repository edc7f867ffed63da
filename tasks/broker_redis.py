"""Redis clients for ttspool's own keys (claims, rate limits, strikes, deliveries,
voices), the exporter, the gateway and `ttspool doctor`, from the same URL Celery uses.

A `redis://` or `rediss://` URL names one Redis. A `sentinel://` URL names the Redis
Sentinels watching a primary (with TTSPOOL_REDIS_MASTER_NAME), in the form kombu and
Celery read: `sentinel://[:password@]host:port[/db];sentinel://host:port;...`, with the
first entry's password and db meaning the primary's. redis-py parses only the first two
forms, so the sentinel list is read here; the clients are redis-py's own Sentinel-managed
ones, which ask the sentinels for the primary on every (re)connect and drop a connection
to a primary that was demoted.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from .settings import Settings

T = TypeVar("T")

SENTINEL_PORT = 26379
# Each sentinel asked for the primary gets this long: a dead one is passed over quickly.
_SENTINEL_TIMEOUTS = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels' (host, port) pairs, and the primary's db, username and password."""
    hosts: list[tuple[str, int]] = []
    primary: dict[str, Any] = {}
    for i, chunk in enumerate(part for part in url.split(";") if part):
        parts = urlsplit(chunk)
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel://host:port entry: {chunk.split('@')[-1]!r}")
        hosts.append((parts.hostname, parts.port or SENTINEL_PORT))
        if i == 0:
            path = parts.path.strip("/")
            primary["db"] = int(path) if path else 0
            if parts.username:
                primary["username"] = unquote(parts.username)
            if parts.password:
                primary["password"] = unquote(parts.password)
    return hosts, primary


class FailoverConnection(SentinelManagedConnection):
    """redis-py (8.1) re-opens a connection dropped in the middle of a command, inside
    that command's retries, at the address it had: every retry of a command caught by a
    failover knocks on the dead primary until the retries run out. Here the sentinels
    are asked again whenever a connection to the primary is (re)opened."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class AsyncFailoverConnection(AsyncSentinelManagedConnection):
    """FailoverConnection for redis.asyncio (the same re-open path)."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


def redis_client(url: str, master_name: str, **kwargs: Any) -> redis.Redis:
    """A client for the Redis at `url` (the current primary, for a sentinel:// URL)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    hosts, primary = sentinel_hosts(url)
    return Sentinel(hosts, sentinel_kwargs=_SENTINEL_TIMEOUTS).master_for(
        master_name, connection_class=FailoverConnection, **primary, **kwargs)


def async_redis_client(url: str, master_name: str, **kwargs: Any) -> aioredis.Redis:
    if not is_sentinel(url):
        return aioredis.Redis.from_url(url, **kwargs)
    hosts, primary = sentinel_hosts(url)
    return AsyncSentinel(hosts, sentinel_kwargs=_SENTINEL_TIMEOUTS).master_for(
        master_name, connection_class=AsyncFailoverConnection, **primary, **kwargs)


# The Redis URLs this process has reached (RideOutRetry): process-wide, so that a client
# made after the first contact (a worker's runner, a new gateway connection) rides out too.
_reached: set[str] = set()


class RideOutRetry(Retry):
    """redis-py's Retry, once this process has reached the Redis at `url`. Until then a
    connection or timeout error is raised at once: a Redis that was never there (none
    started, a wrong URL) is a setup to fix, and 20 s of retries would only hide that.
    A Redis lost after it answered (a restart, a failover) is ridden out."""

    def __init__(self, url: str, backoff: ExponentialBackoff, retries: int) -> None:
        super().__init__(backoff, retries)
        self.url = url

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        if self.url in _reached:
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)
        try:
            result = do()
        except self._supported_errors as error:
            if is_retryable is None or is_retryable(error):
                if with_failure_count:
                    fail(error, 1)
                else:
                    fail(error)
            raise
        _reached.add(self.url)
        return result


def broker_redis(settings: Settings) -> redis.Redis:
    """A client that rides out a Redis restart, a dropped connection or a Sentinel
    failover: a call that meets a connection or timeout error reconnects (to whichever
    Redis the sentinels name primary by then) and is tried again for about as long as a
    Celery publish retries (task_publish_retry_policy, about 20 s). Errors Redis answers
    with (OOM at maxmemory, a wrong type) are not retried. Until this process has reached
    that Redis once, nothing is retried (RideOutRetry) and a connect gives up after 2 s:
    a Redis that is not there fails the first call at once."""
    return redis_client(settings.broker_url, settings.redis_master_name, socket_timeout=10, socket_connect_timeout=2,
                        retry=RideOutRetry(settings.broker_url, ExponentialBackoff(cap=3, base=0.5), 10))

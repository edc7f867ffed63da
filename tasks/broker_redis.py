"""The Redis client producers and workers use for their own keys (claims, rate limits,
strikes, the output index, voices) next to Celery's."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .settings import Settings


def broker_redis(settings: Settings) -> redis.Redis:
    """A client that rides out a Redis restart or a dropped connection: a call that
    meets a connection or timeout error reconnects and is tried again for about as long
    as a Celery publish retries (task_publish_retry_policy, about 20 s). Errors Redis
    answers with (OOM at maxmemory, a wrong type) are not retried."""
    return redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=5,
                                retry=Retry(ExponentialBackoff(cap=3, base=0.5), 10))

"""kombu's Redis transport, minus one way to stop a worker with a single LPUSH.

kombu decodes every item it pops off a queue list as a JSON message envelope inside
the worker's event loop. An item that is not one (garbage, a truncated write, another
program's data, an envelope without properties) raises out of the loop, and Celery
stops the worker as an "unrecoverable error". Such an item names no job to fail, so
it is logged with the reason and skipped; the worker keeps serving. Messages that do
decode go on to Celery, whose own checks (workers.consumer) record a FAILURE.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

# What decoding or unpacking an envelope can raise: JSON/UTF-8/base64 errors
# (ValueError), missing keys or unknown body encodings (LookupError), wrong types.
_UNDECODABLE = (ValueError, LookupError, TypeError, AttributeError)


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except _UNDECODABLE as exc:
            log.error("skipped a queue item that is not a Celery message (%s: %.200s)", type(exc).__name__, exc)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    Channel = Channel

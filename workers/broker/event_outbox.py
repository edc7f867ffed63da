"""Task events of batched jobs, sent from the consumer's event loop.

The batch runner's threads (the GPU's, the store threads') emit task events
(workers/pipeline/task_events.py). Celery's dispatcher belongs to the event loop: it
buffers task events in lists its flush empties without a lock, so an event added from
another thread during a flush was lost (a Flower test saw a job stay STARTED), and the
flush it schedules from there could be lost too. Events wait here and the event loop
sends them every EVENTS_EVERY_S.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

EVENTS_EVERY_S = 0.05


class EventOutbox:
    def __init__(self) -> None:
        self._events: deque[tuple[str, dict[str, Any]]] = deque()
        self._eventer: Any = None
        self._tref: Any = None
        self._looped = False

    def attach(self, consumer: Any) -> None:
        """The consumer's dispatcher and event loop; again after every reconnect."""
        if self._tref is not None:
            self._tref.cancel()
        self._eventer = consumer.event_dispatcher
        self._looped = consumer.hub is not None
        self._tref = consumer.hub.call_repeatedly(EVENTS_EVERY_S, self._send) if consumer.hub else None

    def send(self, event_type: str, **fields: Any) -> None:
        """From any thread."""
        if not self._looped:
            # No event loop: Celery's dispatcher does not buffer, it publishes at once.
            if self._eventer is not None:
                self._eventer.send(event_type, **fields)
            return
        self._events.append((event_type, fields))

    def _send(self) -> None:
        eventer = self._eventer
        while self._events and eventer is not None:
            event_type, fields = self._events.popleft()
            try:
                eventer.send(event_type, **fields)
            except Exception as err:  # noqa: BLE001 - events are for watching: never stop the loop
                log.warning("could not send %s for job %s: %s", event_type, fields.get("uuid"), err)

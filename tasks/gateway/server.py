"""The uvicorn server of `ttspool serve`, with its limits from Settings: idle (keep-alive)
and header deadlines, the largest header block, and open connections."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..settings import Settings

# h11's own default, set here so that it is written down: a request's line and headers.
MAX_HEADER_BYTES = 16 * 1024


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's config for `app`; the body deadline is the app's (app.BodyLimits)."""
    header_timeout = settings.http_header_timeout

    class Protocol(_DeadlineH11):
        header_timeout_s = header_timeout

    return uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="info", access_log=False,
        http=Protocol, timeout_keep_alive=settings.http_keepalive_timeout,
        # Past it uvicorn answers 503 (connections and running requests, each counted).
        limit_concurrency=settings.http_max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with the two deadlines it lacks: a new connection that sends
    nothing is idle (uvicorn times out only those that served a request), and a request's
    headers must all be in within `header_timeout_s` of its first byte (uvicorn waits
    forever, so a client sending a byte now and then held a connection for good)."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

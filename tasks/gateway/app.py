"""The gateway's app (FastAPI on uvicorn), see tasks/gateway/__init__.py: the routers,
each resource's own (routes_*.py), on the state and tenant dependencies of deps.py,
with the errors in OpenAI's shape, body limits (size and time) and request metrics."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
import redis
from fastapi import FastAPI, HTTPException, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from kombu.exceptions import OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..claims import split_task_id
from ..errors import RateLimited, SubmitStopped, TtspoolError
from ..schema import JobValidationError
from ..settings import Settings
from ..voices import VoiceError, VoiceNotFound
from . import routes_jobs, routes_ops, routes_speech, routes_voices
from .deps import GatewayState, Storage, bearer, gateway_state
from .fixes import http_fix

log = logging.getLogger(__name__)


def create_app(settings: Settings, storage: Storage) -> FastAPI:
    state = GatewayState(settings, storage)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.waiter.start()
        try:
            yield
        finally:
            await state.waiter.close()
            state.client.close()

    app = FastAPIOffline(title="ttspool", version="1", lifespan=lifespan,
                         description="OpenAI's speech API and a job API on a pool of batched ChatTTS workers.")
    app.state.gateway = state  # where deps.gateway_state finds it for the routes
    # Inside _guard (added later, so outside it), which counts its 408s and 413s.
    app.add_middleware(BodyLimits, limit=settings.http_max_body, timeout_s=settings.http_body_timeout)
    app.middleware("http")(_guard)
    for kind, handler in _ERROR_HANDLERS:
        app.exception_handler(kind)(handler)
    # In this order, the OpenAPI document's; the tenants' routes declare the API key.
    for routes in (routes_speech, routes_voices, routes_jobs):
        app.include_router(routes.router, dependencies=[Security(bearer)])
    app.include_router(routes_ops.router)
    return app


def _error(status: int, message: str, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    # OpenAI's error shape, so its SDK raises its usual exceptions with our message.
    return JSONResponse({"error": {"message": message, "type": kind, "code": status, **extra}}, status,
                        headers=headers)


async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    state = gateway_state(request)
    t0 = time.perf_counter()
    state.in_flight.inc()
    try:
        response = await call_next(request)
    finally:
        state.in_flight.dec()
    name = getattr(request.scope.get("route"), "path", "unmatched")
    state.requests.labels(name, str(response.status_code)).inc()
    state.latency.labels(name).observe(time.perf_counter() - t0)
    return response


class _BodyRefused(Exception):
    pass


class BodyLimits:
    """413 for a body over `limit` bytes, declared or (chunked) counted as it is read;
    408 for one not all in within `timeout_s` of its headers (uvicorn has no body
    timeout: a declared body that never came held the request forever).

    Pure ASGI: a route's body parsing turns any error of the receive channel into a
    400, so the refusal is raised there to stop the route, and whatever the route
    answers instead is replaced by it."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.timeout_s
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            await _refuse(scope, receive, send, deadline, 413, f"request body over {self.limit} bytes")
            return
        seen, body_done = 0, False
        refusal: tuple[int, str] | None = None
        started = False

        async def limited() -> Message:
            nonlocal seen, body_done, refusal
            if body_done:  # after the body only a disconnect can come, whenever it does
                return await receive()
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                refusal = (408, f"request body not received within {self.timeout_s:g} s")
                raise _BodyRefused from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                refusal = (413, f"request body over {self.limit} bytes")
                raise _BodyRefused
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def answering(message: Message) -> None:
            nonlocal started
            if refusal is None:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, limited, answering)
        except _BodyRefused:
            pass
        if refusal is not None and not started:
            await _refuse(scope, receive, send, deadline if refusal[0] == 413 else 0.0, *refusal)


async def _refuse(scope: Scope, receive: Receive, send: Send, drain_until: float, status: int, message: str) -> None:
    """Answer `status` and close. The body still coming is read and dropped first (until
    `drain_until`): closing a socket with unread data resets the connection, and a client
    still sending would lose the answer with it."""
    with anyio.move_on_after(max(0.0, drain_until - anyio.current_time())):
        while (m := await receive())["type"] == "http.request" and m.get("more_body", False):
            pass
    await _error(status, message, headers={"Connection": "close"})(scope, receive, send)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error",
                  headers=getattr(exc, "headers", None))


async def _unreadable(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(400, "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}"
                                 for e in exc.errors()[:8]))


async def _invalid(request: Request, exc: JobValidationError) -> JSONResponse:
    return _error(400, str(exc) + http_fix(exc))


async def _bad_voice(request: Request, exc: VoiceError) -> JSONResponse:
    return _error(404 if isinstance(exc, VoiceNotFound) else 400, str(exc) + http_fix(exc))


async def _backend_failed(request: Request, exc: TtspoolError) -> JSONResponse:
    # What is left after the handlers above: the object store failed (StorageError,
    # whose message names the object, never credentials).
    log.warning("%s: %s", request.url.path, exc)
    return _error(503, str(exc), "server_error", headers={"Retry-After": "5"})


async def _submit_stopped(request: Request, exc: SubmitStopped) -> JSONResponse:
    # The ids a retry of the same request will find sent; with keys, as the tenant names them.
    keys = gateway_state(request).keys.enabled
    enqueued = [split_task_id(i)[1] if keys else i for i in exc.enqueued]
    log.warning("%s: %s", request.url.path, exc)
    return _error(503, str(exc), "server_error", headers={"Retry-After": "5"}, enqueued=enqueued)


async def _limited(request: Request, exc: RateLimited) -> JSONResponse:
    return _error(429, str(exc), "rate_limit_error", headers={"Retry-After": str(max(1, round(exc.retry_after_s + 0.5)))})


async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("broker unreachable: %s", exc)
    return _error(503, "the queue (Redis) is unreachable; try again", "server_error", headers={"Retry-After": "5"})


# Starlette picks the handler of the exception's nearest class, so the order here is free.
_ERROR_HANDLERS: tuple[tuple[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]], ...] = (
    (HTTPException, _http_error),
    (RequestValidationError, _unreadable),
    (JobValidationError, _invalid),
    (VoiceError, _bad_voice),
    (TtspoolError, _backend_failed),
    (SubmitStopped, _submit_stopped),
    (RateLimited, _limited),
    (redis.RedisError, _broker_down),
    (OperationalError, _broker_down),
    (ConnectionError, _broker_down),
)

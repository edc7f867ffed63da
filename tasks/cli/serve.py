"""`ttspool serve`: the HTTP gateway (tasks/gateway), torch-free."""

from __future__ import annotations

import argparse
import logging

from ..settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the HTTP gateway: OpenAI's /v1/audio/speech and a job API on the pool")
    s.add_argument("--host", help="address to listen on (TTSPOOL_HTTP_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (TTSPOOL_HTTP_PORT, default 8000)")
    s.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from storage import open_storage

    from ..gateway.app import create_app
    from ..gateway.api_keys import ApiKeys, check_exposure
    from ..gateway.server import server_config

    settings = settings.override(http_host=args.host, http_port=args.port)
    check_exposure(ApiKeys(settings.api_keys), settings.http_host)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A request's storage calls end well within a client's patience (60 s): a store that
    # stopped answering costs an error, not a hung request.
    timeout = settings.http_storage_timeout
    storage = open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_sse=settings.s3_sse,
                           s3_max_attempts=settings.http_storage_attempts, s3_timeouts=(min(5, timeout), timeout))
    # One process, one event loop: waiting requests cost a future each, not a thread.
    uvicorn.Server(server_config(create_app(settings, storage), settings)).run()
    return 0

"""`ttspool exporter`: the per-deployment queue metrics process (torch-free)."""

from __future__ import annotations

import argparse

from ..settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exporter", help="export queue depth, unacked and oldest message age to Prometheus")
    p.add_argument("--port", type=int, default=9809, help="HTTP port for /metrics (default 9809)")
    p.add_argument("--addr", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.set_defaults(handler=_exporter)


def _exporter(args: argparse.Namespace, settings: Settings) -> int:
    from ..queue_exporter import run_exporter

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    return run_exporter(settings, args.addr, args.port)

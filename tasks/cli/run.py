"""`ttspool worker` and `ttspool run`: a GPU worker, or the whole pipeline on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import Settings
from .common import add_engine_flags


def add_commands(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worker", help="run one GPU worker")
    add_engine_flags(w)
    w.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    w.set_defaults(handler=_worker)

    r = sub.add_parser("run", help="run the whole pipeline locally on the example jobs")
    add_engine_flags(r)
    r.add_argument("--jobs", type=Path, help="JSONL file of jobs (default: the shipped examples)")
    r.add_argument("--out", type=Path, default=Path("out"), help="output folder when no storage is configured")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for every job")
    r.set_defaults(handler=_run)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.worker import run_worker

    run_worker(settings, args.loglevel.upper())
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .local_run import run_local

    return run_local(settings, args.jobs, args.out, args.timeout)

"""`ttspool up`: a local pool that stays up for day two: a Redis of its own, one worker and
the HTTP gateway, started together, stopped together (Ctrl-C, SIGTERM or a hang-up).

Its Redis is never an unrelated one on 6379: `up` starts its own redis-server on a loopback
port, with its data (append-only) and this run's state in `<TTSPOOL_CACHE_DIR>/up/`, and
prints the environment line every other command needs to reach it. A second `ttspool up`
while one runs starts nothing and prints the same lines again. Each child runs in a process
group of its own, so a terminal's Ctrl-C reaches `up` alone, which stops the gateway first
(no new work), then the worker (a warm shutdown: its running batch is recorded), then Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ..polling import poll
from ..settings import Settings, redact_url
from .common import add_engine_flags
from .local_redis import LocalRedis, free_port, port_is_free
from .local_run import child_env, fetch_model_first
from .worker_process import STOP_S, check_alive, start_cli, start_worker, stop_worker

STATE_FILE = "up.json"
_GATEWAY_STOP_S = 15.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_commands(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("up", help="a local pool for day two: its own Redis, one worker and the gateway, "
                                  "until Ctrl-C; prints the URLs and the environment other commands need")
    add_engine_flags(u)
    u.add_argument("--host", help="gateway address (TTSPOOL_HTTP_HOST, default 127.0.0.1)")
    u.add_argument("--port", type=int, help="gateway port (TTSPOOL_HTTP_PORT, default 8000)")
    u.add_argument("--timeout", type=float, default=900.0,
                   help="seconds to wait for the worker's model and the gateway before giving up")
    u.set_defaults(handler=_up)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class _Stop(Exception):
    """A stop signal arrived."""


def _running_up(pid: int) -> bool:
    """Whether `pid` is a `ttspool up`, not a process that got its number after a reboot."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"up" in args


def _read_state(path: Path) -> dict[str, object]:
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def _answers(url: str) -> bool:
    """True once `url` answers 200 (a /healthz)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _shown_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _lines(settings: Settings, children: list[_Child], state_dir: Path, redis_server: LocalRedis | None) -> list[str]:
    gateway = f"http://{_shown_host(settings.http_host)}:{settings.http_port}"
    # The model too: `doctor` and a second `ttspool worker` must check and load this pool's.
    env = {"TTSPOOL_BROKER_URL": settings.broker_url, "TTSPOOL_STORAGE_URL": settings.storage_url,
           "TTSPOOL_MODEL": settings.model}
    if "result_backend" in settings.explicit:
        env["TTSPOOL_RESULT_BACKEND"] = settings.backend_url
    pids = ", ".join(([f"redis {redis_server.proc.pid}"] if redis_server and redis_server.proc else [])
                     + [f"{c.name} {c.proc.pid}" for c in children])
    return [
        f"ttspool up: running ({pids}); Ctrl-C stops them all",
        f"  gateway  {gateway}",
        f"  page     {gateway}/",
        f"  docs     {gateway}/docs",
        f"  metrics  {gateway}/metrics (gateway), "
        f"http://{_shown_host(settings.metrics_addr)}:{settings.metrics_port}/metrics (worker)",
        f"  logs     {state_dir / 'worker.log'}, {state_dir / 'gateway.log'}",
        f"  broker   {redact_url(settings.broker_url)} "
        + (f"(this pool's own Redis, data in {state_dir / 'redis'})" if redis_server else "(TTSPOOL_BROKER_URL)"),
        "Every other ttspool command, and Client(), reaches this pool with:",
        "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
    ]


def _own_redis(settings: Settings, state: dict[str, object], state_dir: Path) -> LocalRedis | None:
    """This pool's Redis, unless the user named another broker. The URL an earlier `up`
    printed (exported in this shell) is this pool's own, not another broker."""
    previous = state.get("broker_url")
    if "broker_url" in settings.explicit and settings.broker_url != previous:
        return None
    # The same port as last time when it is free, so an exported line stays right.
    port = state.get("redis_port")
    if not isinstance(port, int) or not port_is_free(port):
        port = free_port()
    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    return LocalRedis(port, data_dir=data, persist=True, own_group=True)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    state_dir = settings.cache_path / "up"
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / STATE_FILE
    state = _read_state(state_path)
    pid = state.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _running_up(pid):
        print(f"ttspool up is already running (pid {pid}); nothing started", flush=True)
        print("\n".join(str(line) for line in state.get("lines", [])), flush=True)
        return 0

    # Before anything is started: Ctrl-C during a first download simply ends the command.
    fetch_model_first(settings)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    redis_server = None
    children: list[_Child] = []
    try:
        redis_server = _own_redis(settings, state, state_dir)
        if redis_server is not None:
            redis_server.start()
            settings = settings.override(broker_url=redis_server.url)
        settings = settings.override(
            http_host=args.host, http_port=args.port,
            # Loopback and a free port unless set: 9808 may be a real worker's. Never off:
            # `up` knows its worker is ready from its /healthz.
            metrics_addr=None if "metrics_addr" in settings.explicit else "127.0.0.1",
            metrics_port=settings.metrics_port if "metrics_port" in settings.explicit and settings.metrics_port
            else free_port())
        env = child_env(settings)
        for name, cli_args in (("gateway", ["serve"]), ("worker", None)):
            log = state_dir / f"{name}.log"
            proc = (start_worker(env, log, own_group=True) if cli_args is None
                    else start_cli(cli_args, env, log, own_group=True))
            children.append(_Child(name, proc, log))
        _wait_ready(settings, children, stopping, args.timeout)
        lines = _lines(settings, children, state_dir, redis_server)
        state_path.write_text(json.dumps({
            "pid": os.getpid(), "broker_url": settings.broker_url,
            "redis_port": redis_server.port if redis_server is not None else None, "lines": lines}))
        print("\n".join(lines), flush=True)
        while not stopping.wait(0.5):
            _check(children)
        print("ttspool up: stopping", flush=True)
        return 0
    except _Stop:
        print("ttspool up: stopped before it was ready", flush=True)
        return 130
    finally:
        # The gateway first (no new work), then the worker, then the Redis they use.
        for child in children:
            stop_worker(child.proc, _GATEWAY_STOP_S if child.name == "gateway" else STOP_S)
        if redis_server is not None:
            redis_server.close()
        if _read_state(state_path).get("pid") == os.getpid():
            state_path.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check(children: list[_Child]) -> None:
    for child in children:
        check_alive(child.proc, child.log, child.name)


def _wait_ready(settings: Settings, children: list[_Child], stopping: threading.Event, timeout: float) -> None:
    """Both answer their /healthz: the gateway reaches Redis, the worker has loaded its model."""
    urls = [f"http://{_shown_host(settings.http_host)}:{settings.http_port}/healthz",
            f"http://{_shown_host(settings.metrics_addr)}:{settings.metrics_port}/healthz"]
    pending = list(urls)

    def step() -> bool | None:
        if stopping.is_set():
            raise _Stop
        _check(children)
        pending[:] = [u for u in pending if not _answers(u)]
        return True if not pending else None

    poll(step, timeout=timeout, every=0.5,
         timed_out=lambda: f"not ready after {timeout:.0f} s: {', '.join(pending)} did not answer 200")

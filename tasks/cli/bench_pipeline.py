"""`ttspool bench --pipeline`: the whole path on this machine, next to the engine alone.

Starts everything on 127.0.0.1 free ports: a throwaway redis-server, an S3 endpoint
(moto's, from the test extra, unless TTSPOOL_STORAGE_URL=s3://... and
TTSPOOL_S3_ENDPOINT_URL name one), a delay proxy in front of it
(workers/bench/delay_proxy.py) and one worker process; workers/bench/pipeline_bench.py
measures. Everything started here is stopped here, by pid or handle, on success, error
or Ctrl-C alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from ..errors import UsageError
from ..settings import Settings
from .local_redis import LocalRedis
from .local_run import child_env

# moto accepts any credentials; these reach only the worker this command starts.
_MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ttspool-bench", "AWS_SECRET_ACCESS_KEY": "ttspool-bench",
                     "AWS_DEFAULT_REGION": "us-east-1"}
_WORKER_STOP_S = 60.0


@dataclass(frozen=True)
class Bucket:
    endpoint: str  # http://host:port, what the proxy forwards to
    bucket: str
    prefix: str  # this run's own: cleared between passes, and at the end
    credentials: dict[str, str]  # for the worker's environment and our own client; empty: boto3's chain


def _upstream(settings: Settings) -> str | None:
    """The S3 endpoint the settings name for the bench, or None (use moto)."""
    if not settings.storage_url.startswith("s3://") or not settings.s3_endpoint_url:
        return None
    if not settings.s3_endpoint_url.startswith("http://"):
        # The proxy forwards bytes: a TLS endpoint's certificate would not match 127.0.0.1.
        raise UsageError("--pipeline forwards storage through a local delay proxy and needs a plain http:// "
                         f"TTSPOOL_S3_ENDPOINT_URL, got {settings.s3_endpoint_url.split('://')[0]}://")
    return settings.s3_endpoint_url.rstrip("/")


def check_storage(settings: Settings) -> None:
    """UsageError (exit 2) before any work when there is no S3 endpoint to use."""
    if _upstream(settings) is not None:
        return
    try:
        import moto.server  # noqa: F401 - only whether it imports
    except ImportError:
        raise UsageError("--pipeline needs an S3 endpoint: install the test extra (pip install 'ttspool[test]', "
                         "for moto's server), or name one with TTSPOOL_STORAGE_URL=s3://bucket/prefix and "
                         "TTSPOOL_S3_ENDPOINT_URL=http://host:port") from None


def _start_s3(settings: Settings, stack: ExitStack) -> Bucket:
    upstream = _upstream(settings)
    run = f"ttspool-bench-{uuid.uuid4().hex[:8]}"
    if upstream is not None:
        bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
        return Bucket(upstream, bucket, "/".join(p for p in (prefix.strip("/"), run) if p), {})
    from moto.server import ThreadedMotoServer

    # Its HTTP server logs every request on stderr, between the bench's own lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stack.callback(server.stop)
    host, port = server.get_host_and_port()
    found = Bucket(f"http://{host}:{port}", "ttspool-bench", run, _MOTO_CREDENTIALS)
    client = _s3_client(found)
    try:
        client.create_bucket(Bucket=found.bucket)
    finally:
        client.close()  # a kept-alive connection would hold one of moto's threads
    return found


def _s3_client(b: Bucket) -> Any:
    import boto3

    creds = {"aws_access_key_id": b.credentials["AWS_ACCESS_KEY_ID"],
             "aws_secret_access_key": b.credentials["AWS_SECRET_ACCESS_KEY"],
             "region_name": b.credentials["AWS_DEFAULT_REGION"]} if b.credentials else {}
    return boto3.session.Session().client("s3", endpoint_url=b.endpoint, **creds)


class _Storage:
    """The worker's storage path as the bench steers it: the proxy's delay, and this
    run's objects (workers/bench/pipeline_bench.StoragePath)."""

    def __init__(self, bucket: Bucket, proxy: Any) -> None:
        self.bucket = bucket
        self.proxy = proxy
        self.client = _s3_client(bucket)  # straight to the endpoint: clearing is not measured

    def set_delay(self, ms: float) -> None:
        self.proxy.delay_ms = ms

    def round_trips(self) -> int:
        return int(self.proxy.round_trips)

    def close(self, console: Any) -> None:
        """Deletes what this run stored (a failure is only logged: it must not hide the
        bench's result or error), then closes the client's kept-alive connections."""
        _quietly(self.clear, console)
        self.client.close()

    def clear(self) -> int:
        """Deletes every object under this run's prefix, and nothing else."""
        b, n = self.bucket, 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=b.bucket, Prefix=b.prefix + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=b.bucket, Delete={"Objects": keys, "Quiet": True})
                n += len(keys)
        return n


def _quietly(fn: Callable[[], object], console: Any) -> None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - reported, and the cleanup goes on
        console.log(f"cleanup: {type(err).__name__}: {err}")


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a warm shutdown finishes the running batch), SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _start_worker(settings: Settings, extra_env: dict[str, str], log: Path,
                  stack: ExitStack) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "worker", "--loglevel", "INFO"],
                                env=child_env(settings, extra_env), stdout=out, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc, _WORKER_STOP_S)
    return proc


def run_pipeline(args: argparse.Namespace, settings: Settings, console: Any, load_engine: Callable[[], Any]) -> int:
    top = args.batch_sizes[-1]
    bulk = args.bulk_jobs or 2 * top
    if bulk <= top:
        raise UsageError(f"--bulk-jobs must exceed the batch size ({top}): the realtime jobs are sent as "
                         "the second bulk batch starts")
    rt = args.rt_jobs or min(4, top)
    if not 1 <= rt <= 256 or args.storage_delay_ms < 0 or args.timeout <= 0:
        raise UsageError("--rt-jobs must be 1-256, --storage-delay-ms at least 0, --timeout above 0")
    check_storage(settings)
    from workers.bench import pipeline_bench as pb

    sets = pb.job_sets(args.jobs, bulk, rt)
    try:
        # The engine alone batches as the worker will: refilling ended rows when
        # TTSPOOL_REFILL is on.
        engine, machine = pb.engine_side(load_engine, sets, top, refill=settings.refill)
        console.log(f"engine alone, B={top} ({engine['mode']}): {engine['audio_s_per_s']:.2f} audio s/s "
                    f"in {engine['wall_s']:.1f} s")
        work, pids, s3 = _pipeline(args, settings, console, sets, top)
    except KeyboardInterrupt:
        console.log("interrupted: everything started here is stopped")
        return 130
    result = {**pb.summarize(engine, machine, work, batch_size=top, jobs=args.jobs),
              "pids": pids,  # every one stopped by now
              "s3": s3}
    _print(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _pipeline(args: argparse.Namespace, settings: Settings, console: Any, sets: Any,
              top: int) -> tuple[dict[str, Any], dict[str, int], str]:
    """Starts the parts, runs the workloads, stops the parts: (numbers, pids, S3 kind)."""
    from workers.bench import pipeline_bench as pb
    from workers.bench.delay_proxy import DelayProxy

    logs = Path(tempfile.mkdtemp(prefix="ttspool-bench-"))
    failed = True
    pids: dict[str, int] = {}

    def tidy() -> None:
        if failed:
            console.log(f"the worker's log is kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)

    with ExitStack() as stack:
        stack.callback(tidy)
        redis = stack.enter_context(LocalRedis())
        assert redis.proc is not None
        pids["redis"] = redis.proc.pid
        bucket = _start_s3(settings, stack)
        where = urlsplit(bucket.endpoint)
        proxy = DelayProxy((where.hostname or "127.0.0.1", where.port or 80)).start()
        stack.callback(proxy.close)
        storage = _Storage(bucket, proxy)
        stack.callback(storage.close, console)  # after the worker stopped: callbacks unwind last in, first out
        # Everything the worker needs from the user's settings (model, device, cache, ...)
        # except where it talks to: this command's own Redis and bucket, through the proxy.
        worker_settings = settings.override(
            broker_url=redis.url, result_backend=redis.url, storage_url=f"s3://{bucket.bucket}/{bucket.prefix}",
            s3_endpoint_url=proxy.url, max_batch=top, metrics_port=0, rate_limits="")
        log = logs / "worker.log"
        worker = _start_worker(worker_settings, bucket.credentials, log, stack)
        pids["worker"] = worker.pid

        def alive() -> None:
            if worker.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the worker exited with code {worker.returncode}; its log ({log}) ends: {tail}")

        work = asyncio.run(pb.run_workloads(worker_settings, sets, top, (0.0, float(args.storage_delay_ms)),
                                            storage, alive, args.timeout, log=console.log))
        failed = False
    return work, pids, "moto" if bucket.credentials else "endpoint"


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    e, b = result["engine"], result["batch_size"]
    table = Table(title=f"{result['jobs']} jobs at B={b} on {result['model']} ({result['device']}, "
                        f"{result['dtype']}): the engine alone, then submitted to a worker")
    for col in ("run", "storage delay ms", "storage round trips", "audio s", "wall s", "audio s/s", "x engine"):
        table.add_column(col, justify="left" if col == "run" else "right")
    table.add_row(f"engine alone ({e['mode']})", "-", "-", f"{e['audio_s']:.2f}", f"{e['wall_s']:.2f}", f"{e['audio_s_per_s']:.2f}",
                  "1.00")
    for r in result["pipeline"]:
        table.add_row("pipeline", f"{r['storage_delay_ms']:g}", str(r["storage_round_trips"]), f"{r['audio_s']:.2f}",
                      f"{r['wall_s']:.2f}", f"{r['audio_s_per_s']:.2f}", f"{r['ratio_to_engine']:.2f}")
    lat = result["latency"]
    lat_table = Table(title=f"mixed load, storage delay {lat['storage_delay_ms']:g} ms: enqueue to recorded result "
                            f"(realtime sent {lat['realtime_submitted_after_s']:.1f} s after the bulk jobs, "
                            f"{lat['bulk_left_at_realtime_submit']} bulk jobs still unfinished)")
    for col in ("priority", "jobs", "p50 s", "p99 s", "max s"):
        lat_table.add_column(col, justify="left" if col == "priority" else "right")
    for name in ("realtime", "bulk"):
        s = lat[name]
        lat_table.add_row(name, str(s["jobs"]), f"{s['p50_s']:.3f}", f"{s['p99_s']:.3f}", f"{s['max_s']:.3f}")
    out = Console(width=120)
    out.print(table)
    out.print(lat_table)
    print(f"realtime jobs: p50 {lat['realtime']['p50_s']:.3f} s = {lat['realtime_p50_vs_engine']:.2f}x the engine's "
          f"{e['realtime_jobs_s']:.3f} s for the same jobs alone")

"""`ttspool bench --pipeline`: the whole path on this machine, next to the engine alone.

Starts everything on 127.0.0.1 free ports: a throwaway redis-server, an S3 endpoint
(moto's, from the test extra, unless TTSPOOL_STORAGE_URL=s3://... and
TTSPOOL_S3_ENDPOINT_URL name one; tasks/cli/bench_s3.py), a delay proxy in front of it
(workers/bench/tcp_proxy.py) and one worker process (tasks/cli/worker_process.py);
workers/bench/pipeline_bench.py measures. Everything started here is stopped here, by pid or handle, on success, error
or Ctrl-C alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from ..errors import UsageError
from ..settings import Settings
from .bench_s3 import Bucket, check_storage, s3_client, start_s3
from .local_redis import LocalRedis
from .local_run import child_env
from .worker_process import check_alive, running_worker


class _Storage:
    """The worker's storage path as the bench steers it: the proxy's delay, and this
    run's objects (workers/bench/pipeline_bench.StoragePath)."""

    def __init__(self, bucket: Bucket, proxy: Any) -> None:
        self.bucket = bucket
        self.proxy = proxy
        self.client = s3_client(bucket)  # straight to the endpoint: clearing is not measured

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
    from workers.bench.tcp_proxy import TcpProxy

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
        bucket = start_s3(settings, stack)
        where = urlsplit(bucket.endpoint)
        proxy = TcpProxy((where.hostname or "127.0.0.1", where.port or 80)).start()
        stack.callback(proxy.close)
        storage = _Storage(bucket, proxy)
        stack.callback(storage.close, console)  # after the worker stopped: callbacks unwind last in, first out
        # Everything the worker needs from the user's settings (model, device, cache, ...)
        # except where it talks to: this command's own Redis and bucket, through the proxy.
        worker_settings = settings.override(
            broker_url=redis.url, result_backend=redis.url, storage_url=f"s3://{bucket.bucket}/{bucket.prefix}",
            s3_endpoint_url=proxy.url, max_batch=top, metrics_port=0, rate_limits="")
        log = logs / "worker.log"
        worker = stack.enter_context(running_worker(child_env(worker_settings, bucket.credentials), log))
        pids["worker"] = worker.pid
        work = asyncio.run(pb.run_workloads(worker_settings, sets, top, (0.0, float(args.storage_delay_ms)), storage,
                                            lambda: check_alive(worker, log), args.timeout, log=console.log))
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

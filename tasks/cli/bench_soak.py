"""`ttspool bench --soak`: thousands of jobs through one worker process; jobs/s, latency
and the worker's idle RSS after each drain (workers/bench/soak.py measures). Starts a
throwaway redis-server, S3 endpoint and worker, as --footprint does; everything started
here is stopped here."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..settings import Settings
from .bench_s3 import Records, check_storage, start_s3
from .local_redis import LocalRedis
from .local_run import child_env
from .worker_process import check_alive, running_worker


def run_soak(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    if not 1 <= args.soak_jobs <= 1_000_000 or not 1 <= args.soak_drain_every or not 1 <= args.soak_window <= 4096:
        raise UsageError("--soak-jobs must be 1-1000000, --soak-drain-every at least 1, --soak-window 1-4096")
    check_storage(settings)
    from workers.bench import soak

    from ..producer import Client

    logs = Path(tempfile.mkdtemp(prefix="ttspool-bench-"))
    log = logs / "worker.log"
    with ExitStack() as stack:
        broker = stack.enter_context(LocalRedis())
        bucket = start_s3(settings, stack)
        worker_settings = settings.override(
            broker_url=broker.url, result_backend=broker.url, storage_url=f"s3://{bucket.bucket}/{bucket.prefix}",
            s3_endpoint_url=bucket.endpoint, metrics_port=0, rate_limits="")
        records = Records(bucket)
        stack.callback(records.close)
        client = Client(worker_settings, storage=records)
        stack.callback(client.close)
        worker = stack.enter_context(running_worker(child_env(worker_settings, bucket.credentials), log))

        def alive() -> None:
            check_alive(worker, log)

        try:
            console.log("waiting for the worker to be ready")
            soak.run_closed_loop(client, soak.jobs(1, first_seed=args.soak_jobs), 1, alive, args.timeout)
            result = soak.soak(client, worker.pid, args.soak_jobs, args.soak_drain_every, args.soak_window, alive,
                               args.timeout, console.log)
        except Exception:
            console.log(f"the worker's log is kept in {logs}")
            raise
    shutil.rmtree(logs, ignore_errors=True)
    result |= {"model": settings.model, "max_batch": settings.max_batch}
    _print(result, console)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["failed"] == 0 else 1


def _print(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    console.print(f"soak: {result['jobs']} jobs, {result['window']} in flight, {result['model']} (max batch "
                  f"{result['max_batch']}): {result['jobs_per_s']} jobs/s, latency p50 {result['latency_p50_s']} s, "
                  f"p99 {result['latency_p99_s']} s")
    table = Table(title="the worker's RSS when idle")
    table.add_column("jobs done", justify="right")
    table.add_column("idle RSS MB", justify="right")
    table.add_row("0 (ready)", f"{result['rss_mb_at_start']:.1f}")
    for row in result["idle_rss_mb"]:
        table.add_row(str(row["jobs"]), f"{row['mb']:.1f}")
    console.print(table)
    console.print(f"idle RSS growth after the first drain: {result['growth_kb_per_job']} KB per job; "
                  f"{result['failed']} job(s) failed")

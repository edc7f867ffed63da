"""`ttspool bench --footprint`: the broker's memory and Redis commands per job, in the
result window and after it (workers/bench/footprint.py measures). Starts a throwaway
redis-server and S3 endpoint (as --pipeline does) and, once the jobs are queued, one
worker; everything started here is stopped here."""

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
from .worker_process import running_worker


def run_footprint(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    if not 1 <= args.footprint_jobs <= 100_000 or not 10 <= args.result_ttl <= 3600:
        raise UsageError("--footprint-jobs must be 1-100000 and --result-ttl 10-3600 s")
    check_storage(settings)
    import redis

    from workers.bench import footprint

    from ..producer import Client

    logs = Path(tempfile.mkdtemp(prefix="ttspool-bench-"))
    with ExitStack() as stack:
        broker = stack.enter_context(LocalRedis())
        bucket = start_s3(settings, stack)
        worker_settings = settings.override(
            broker_url=broker.url, result_backend=broker.url, storage_url=f"s3://{bucket.bucket}/{bucket.prefix}",
            s3_endpoint_url=bucket.endpoint, metrics_port=0, rate_limits="", result_ttl=args.result_ttl)
        r = redis.Redis.from_url(broker.url)
        stack.callback(r.close)
        records = Records(bucket)
        stack.callback(records.close)
        client = Client(worker_settings, storage=records)
        stack.callback(client.close)

        def start_worker() -> None:
            stack.enter_context(running_worker(child_env(worker_settings, bucket.credentials), logs / "worker.log"))

        try:
            result = footprint.measure(r, client, args.footprint_jobs, args.result_ttl, start_worker,
                                       args.timeout, console.log)
        except Exception:
            console.log(f"the worker's log is kept in {logs}")
            raise
    shutil.rmtree(logs, ignore_errors=True)
    _print(result, console)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    n = result["jobs"]
    table = Table(title=f"Broker Redis per job ({n} jobs, result window {result['result_ttl_s']} s)")
    for col in ("key kind", "keys per job", "bytes per job in the window", "bytes per job after it"):
        table.add_column(col, justify="left" if col == "key kind" else "right")
    kinds = sorted(set(result["in_window"]["keys"]) | set(result["after_window"]["keys"]))
    for kind in kinds:
        now = result["in_window"]["keys"].get(kind, {"keys": 0, "bytes": 0})
        later = result["after_window"]["keys"].get(kind, {"keys": 0, "bytes": 0})
        table.add_row(kind, f"{now['keys'] / n:.2f}", f"{now['bytes'] / n:.0f}", f"{later['bytes'] / n:.0f}")
    table.add_row("all (MEMORY USAGE)", "", f"{result['in_window']['bytes_per_job']:.0f}",
                  f"{result['after_window']['bytes_per_job']:.0f}")
    table.add_row("used_memory growth", "", f"{result['in_window']['used_memory_per_job']:.0f}",
                  f"{result['after_window']['used_memory_per_job']:.0f}")
    console.print(table)
    cmds = result["commands_per_job"]
    console.print("Redis commands per job: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cmds.items()))

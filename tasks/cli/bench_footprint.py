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
from .bench_pipeline import Bucket, _s3_client, _start_s3, _start_worker, check_storage
from .local_redis import LocalRedis


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
        bucket = _start_s3(settings, stack)
        worker_settings = settings.override(
            broker_url=broker.url, result_backend=broker.url, storage_url=f"s3://{bucket.bucket}/{bucket.prefix}",
            s3_endpoint_url=bucket.endpoint, metrics_port=0, rate_limits="", result_ttl=args.result_ttl)
        r = redis.Redis.from_url(broker.url)
        stack.callback(r.close)
        records = _Records(bucket)
        stack.callback(records.close)
        client = Client(worker_settings, storage=records)
        stack.callback(client.close)

        def start_worker() -> None:
            _start_worker(worker_settings, bucket.credentials, logs / "worker.log", stack)

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


class _Records:
    """This run's bucket as the producer reads it, with the bucket's own credentials
    (moto's reach only the processes started here, not the default chain)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.client = _s3_client(bucket)

    def _name(self, key: str) -> str:
        return f"{self.bucket.prefix}/{key}"

    def exists(self, key: str) -> bool:
        found = self.client.list_objects_v2(Bucket=self.bucket.bucket, Prefix=self._name(key), MaxKeys=1)
        return any(o["Key"] == self._name(key) for o in found.get("Contents", []))

    def get_bytes(self, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=self.bucket.bucket, Key=self._name(key))["Body"].read()
        return data

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.client.put_object(Bucket=self.bucket.bucket, Key=self._name(key), Body=data, ContentType=content_type)
        return f"s3://{self.bucket.bucket}/{self._name(key)}"

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket.bucket, Key=self._name(key))

    def list_keys(self, prefix: str) -> list[str]:
        found = self.client.list_objects_v2(Bucket=self.bucket.bucket, Prefix=self._name(prefix))
        return sorted(o["Key"].removeprefix(self.bucket.prefix + "/") for o in found.get("Contents", []))

    def close(self) -> None:
        self.client.close()


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

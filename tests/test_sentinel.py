"""A broker that survives losing its primary: Redis Sentinel end to end.

A primary and a replica (AOF on) and three sentinels run as real redis-server processes
on loopback. A worker, a producer, the gateway, the exporter and `ttspool doctor` are
all given only the sentinel:// URL. The primary is SIGKILLed while a batch runs; the
sentinels promote the replica; nothing is restarted or told, and every job submitted
before and after the kill must end SUCCESS, once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.broker_redis import redis_client
from tasks.queue_exporter import QueueCollector
from tasks.settings import Settings

from .conftest import S3Endpoint, run_cli, running_worker, stop_process, worker_env
from .scrape import fetch, parse, value
from .sentinel_cluster import MASTER, SentinelCluster
from .fault_tools import VISIBILITY_S, assert_stored, jobs, until, wait_all
from .test_gateway import KEY_A, start_gateway


def _speak(gateway, text: str) -> bytes:  # type: ignore[no-untyped-def]
    return gateway.sdk().audio.speech.create(model="tts-1", voice="nova", input=text, response_format="wav").content


def test_primary_killed_mid_run(s3: S3Endpoint, aws_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    with SentinelCluster(tmp_path / "redis") as cluster:
        # A fetch whose reply the kill cut off is on the new primary's unacked list and
        # comes back after the visibility timeout: the shortest there is, for the test.
        env = worker_env(cluster.url, s3, aws_env, TTSPOOL_REDIS_MASTER_NAME=MASTER, TTSPOOL_MAX_BATCH="4",
                         TTSPOOL_VISIBILITY_TIMEOUT=str(VISIBILITY_S))
        settings = Settings.from_env(env)
        log = tmp_path / "worker.log"
        gateway = start_gateway(env, tmp_path / "gateway.log", TTSPOOL_API_KEYS=f"acme={KEY_A}")
        try:
            with running_worker(env, log) as (proc, client):
                assert len(_speak(gateway, "Spoken before the primary is lost.")) > 44
                before = client.submit_many(jobs(12, "before"))
                until("a finished job and a batch in flight", lambda: 0 < sum(client.status(i).done for i in before) < 8,
                       300, proc, log, poll=0.02)
                done_before = {i: st for i in before if (st := client.status(i)).done}
                cluster.kill_primary()
                killed = time.monotonic()
                # Nobody waits for the failover: the producer's publish retries until the
                # sentinels name the new primary.
                after = client.submit_many(jobs(8, "after"))
                submit_s = time.monotonic() - killed
                promoted_s = cluster.wait_promoted()
                assert cluster.primary_port() == cluster.replica.port
                assert len(_speak(gateway, "Spoken after the replica took over.")) > 44
                final = wait_all(client, before + after, redis_client(cluster.url, MASTER), log, timeout=120)
                assert_stored(s3, final)
                assert all(dict(zip(before + after, final))[i] == st for i, st in done_before.items())
                samples = parse(fetch(f"http://127.0.0.1:{settings.metrics_port}/metrics")[1])
                made = value(samples, "ttspool_jobs_total", status="success", reason="synthesized") or 0
                # A job whose audio was stored but not recorded when the primary went comes
                # back and is served from storage.
                served = value(samples, "ttspool_jobs_total", status="success", reason="cache_hit") or 0
                # Each job ended once (the warm-up, 20 submitted, 2 spoken), and no audio
                # was made twice: one GPU row per synthesized job.
                assert made + served == 23 and value(samples, "ttspool_batch_size_sum") == made
                assert proc.poll() is None
        finally:
            stop_process(gateway.proc)
        exporter = QueueCollector(settings)
        scraped = {m.name: m.samples for m in exporter.collect()}
        assert scraped["ttspool_broker_up"][0].value == 1
        assert all(s.value == 0 for s in scraped["ttspool_queue_depth"])
        out = run_cli(env, "doctor", "--json", "--only", "broker")
        check = {c["name"]: c for c in json.loads(out.stdout)["checks"]}["broker"]
        assert check["status"] == "warn", check  # the old primary is gone: no replica left
        assert f"primary 127.0.0.1:{cluster.replica.port}" in check["detail"], check
    print(f"\nSentinel failover: the producer's submit returned {submit_s:.1f} s after the kill; "
          f"the replica was primary {promoted_s:.1f} s after that; {len(done_before)} of 12 jobs were done at the kill; "
          f"{served:.0f} job(s) served from storage after it")

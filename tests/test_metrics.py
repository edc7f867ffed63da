"""Worker metrics and health, scraped from a real worker next to the real exporter."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tasks.cli.local_redis import LocalRedis, free_port
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, Settings
from tasks.audio import duration_of
from workers import metrics as worker_metrics
from workers.engine.dtypes import cpu_has_native_bf16

from .conftest import S3Endpoint, start_worker, stop_process, worker_env
from .scrape import Exporter, check_metrics, fetch, names, parse, value, wait_for

N = 4


def test_metrics_port_setting() -> None:
    assert Settings.from_env({}).metrics_port == 9808
    assert Settings.from_env({"TTSPOOL_METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(ValueError, match="TTSPOOL_METRICS_PORT"):
        Settings.from_env({"TTSPOOL_METRICS_PORT": "70000"})


def test_recent_throughput_window_stays_bounded_without_scrapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows older than the window are dropped as rows finish, not only when /metrics is
    scraped: a worker nobody scraped kept one entry per row for its whole life."""
    monkeypatch.setattr(worker_metrics, "RECENT_WINDOW_S", 0.2)
    m = worker_metrics.Metrics()
    for _ in range(50):
        m.audio_done(1.0)
    time.sleep(0.3)
    m.audio_done(2.0)
    assert len(m._recent) == 1
    assert m.recent_throughput() in (0.0, 2.0 / 0.2)


def _stored_seconds(s3: S3Endpoint, url: str) -> float:
    parts = urlsplit(url)
    body = s3.client().get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"].read()
    return duration_of(body)[0]


def test_worker_and_exporter_follow_real_jobs(s3: S3Endpoint, aws_env: dict[str, str], tmp_path: Path) -> None:
    broker = LocalRedis().start()  # its own: no other test's worker may take these jobs
    exporter = Exporter(broker.url, tmp_path / "exporter.log")
    client = Client(Settings(broker_url=broker.url))
    try:
        texts = [f"Metrics job number {i}, a little longer each time{'.' * i}" for i in range(N)]
        ids = client.submit_many([{"text": t} for t in texts])
        empty = client.submit({"text": "***"})  # valid, but nothing speakable after normalization
        late = client.submit({"text": "Nobody waits for this any more.", "ttl_s": 1})
        wait_for(lambda: value(exporter.scrape(), "ttspool_queue_depth", queue=QUEUE_BULK) == N + 2,
                 "queue depth N+2 with no worker", timeout=30)
        # The oldest job is older than `late`'s time to live before any worker runs.
        wait_for(lambda: (value(exporter.scrape(), "ttspool_queue_oldest_age_seconds", queue=QUEUE_BULK) or 0) > 1.5,
                 "the oldest job to age past 1.5 s", timeout=30)

        port = free_port()
        env = worker_env(broker.url, s3, aws_env, TTSPOOL_METRICS_PORT=str(port), TTSPOOL_METRICS_ADDR="127.0.0.1")
        log = tmp_path / "worker.log"
        proc = start_worker(env, log)
        base = f"http://127.0.0.1:{port}"
        try:
            done = client.wait(ids + [empty, late], timeout=300)
            assert [st.status for st in done] == ["SUCCESS"] * N + ["FAILURE", "EXPIRED"], log.read_text()[-3000:]

            def drained() -> bool:
                s = exporter.scrape()
                return (value(s, "ttspool_queue_depth", queue=QUEUE_BULK) == 0
                        and value(s, "ttspool_queue_unacked", queue=QUEUE_BULK) == 0)
            wait_for(drained, "the exporter to see the queue drained and acked", timeout=60)

            status, text = fetch(base + "/metrics")
            assert status == 200
            s = parse(text)
            assert value(s, "ttspool_jobs_total", status="success", reason="synthesized") == N
            assert value(s, "ttspool_jobs_total", status="failure", reason="empty_text") == 1
            assert value(s, "ttspool_jobs_total", status="expired", reason="deadline") == 1
            stored = sum(_stored_seconds(s3, st.url) for st in done[:N])
            recorded = sum(st.duration_s for st in done[:N])
            assert value(s, "ttspool_audio_seconds_total") == pytest.approx(stored, abs=1e-4)
            assert stored == pytest.approx(recorded, abs=1e-4)
            steps = value(s, "ttspool_steps_total")
            assert steps is not None and steps > 0
            batches = value(s, "ttspool_batches_total")
            assert batches is not None and batches >= 1
            assert value(s, "ttspool_batch_size_count") == batches
            assert value(s, "ttspool_batch_size_sum") == N  # distinct texts: one row each
            assert value(s, "ttspool_inference_seconds_count") == batches
            assert value(s, "ttspool_batch_seconds_count") == batches
            assert value(s, "ttspool_upload_seconds_count") == N
            assert value(s, "ttspool_queue_wait_seconds_count", queue=QUEUE_BULK) == N
            assert value(s, "ttspool_job_latency_seconds_count", queue=QUEUE_BULK) == N
            recent = value(s, "ttspool_recent_audio_seconds_per_second")
            assert recent is not None and 0 < recent * 60 <= stored + 1e-6
            load = value(s, "ttspool_model_load_seconds")
            assert load is not None and load > 0
            # The cold start, split, in the metrics and in the worker's ready line.
            start = {p: value(s, "ttspool_worker_start_seconds", phase=p)
                     for p in ("imports", "model_load", "warmup", "queue_setup")}
            assert all(v is not None and v >= 0 for v in start.values()) and start["imports"] > 0, start
            assert re.search(r"worker ready [\d.]+ s after the process started: imports [\d.]+ s, model load "
                             r"[\d.]+ s, warmup [\d.]+ s, queue setup [\d.]+ s", log.read_text()), log.read_text()[-3000:]
            assert value(s, "ttspool_model_loaded") == 1
            info = [dict(labels) for name, labels in s if name == "ttspool_worker_info"]
            assert len(info) == 1 and info[0]["model"] == "random-tiny" and info[0]["device"] == "cpu"
            # The auto dtype on this CPU (workers.engine.dtypes), unless the run sets one
            # (TTSPOOL_DTYPE=float32 runs the suite as a CPU without bfloat16 would).
            dtype = Settings.from_env(env).dtype
            auto = "bfloat16" if cpu_has_native_bf16() else "float32"
            assert info[0]["dtype"] == (auto if dtype == "auto" else dtype) and info[0]["version"]
            # No GPU here: the GPU families are simply absent.
            assert not {n for n in names(s) if n.startswith("ttspool_gpu_")}
            check_metrics(text)
            check_metrics(fetch(exporter.url)[1])

            # The same text again is served from storage: a cache hit, no new audio.
            assert client.wait([client.submit({"text": texts[0]})], timeout=120)[0].status == "SUCCESS"
            s = parse(fetch(base + "/metrics")[1])
            assert value(s, "ttspool_jobs_total", status="success", reason="cache_hit") == 1
            assert value(s, "ttspool_audio_seconds_total") == pytest.approx(stored, abs=1e-4)

            status, body = fetch(base + "/healthz")
            assert status == 200 and json.loads(body) == {"model_loaded": True, "broker": True, "scheduler": "ok"}
            broker.stop()
            status, body = fetch(base + "/healthz")
            assert status == 503 and json.loads(body) == {"model_loaded": True, "broker": False, "scheduler": "ok"}
            broker.start()  # same port, so the worker can stop cleanly
            status, _ = fetch(base + "/healthz")
            assert status == 200
        finally:
            stop_process(proc)
    finally:
        client.close()
        exporter.stop()
        broker.close()

"""The worker's cache lookups, in process: BatchRunner against a real Redis, a real S3
endpoint (moto on loopback) and the random-tiny engine. The jobs of one tick are looked
up in the output index with one Redis round trip, an index record whose object is gone
is not trusted, and an object whose record is gone is still found."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis

from storage import storage_for
from tasks.app import make_app
from tasks.cli.local_redis import LocalRedis
from tasks.settings import Settings
from workers.batch_task import BatchRunner
from workers.engine import Engine

from .conftest import Request, S3Endpoint

_STOP = "stop-monitor"




@pytest.fixture(scope="module")
def runner(own_broker: LocalRedis, s3: S3Endpoint) -> BatchRunner:
    settings = Settings.from_env({
        "TTSPOOL_BROKER_URL": own_broker.url, "TTSPOOL_STORAGE_URL": f"s3://{s3.bucket}/cache-lookup",
        "TTSPOOL_S3_ENDPOINT_URL": s3.url, "TTSPOOL_MODEL": "random-tiny", "TTSPOOL_DEVICE": "cpu",
        "TTSPOOL_MAX_BATCH": "8", "TTSPOOL_MAX_WAIT_MS": "0",
    })
    engine = Engine("random-tiny", device="cpu").load()
    return BatchRunner(make_app(settings), engine, storage_for(settings), settings)


def _requests(texts: list[str]) -> list[Request]:
    return [Request(f"job-{uuid.uuid4().hex[:12]}", {"text": t, "voice": 3, "seed": 7}) for t in texts]


def _run_until_done(runner: BatchRunner, requests: list[Request]) -> None:
    held = list(requests)
    for _ in range(20):
        out = runner(held)
        held = [r for r in held if r.id not in out.finished]
        if not held:
            return
    raise AssertionError(f"{len(held)} job(s) never finished")


def _results(runner: BatchRunner, requests: list[Request]) -> list[dict[str, Any]]:
    metas = [runner.app.backend.get_task_meta(r.id) for r in requests]
    assert all(m["status"] == "SUCCESS" for m in metas), metas
    return [m["result"] for m in metas]


def _index_commands(own_broker: LocalRedis, work: Any) -> list[list[str]]:
    """The commands that touched the output index while `work()` ran, seen by MONITOR."""
    seen: list[list[str]] = []
    conn = redis.Redis.from_url(own_broker.url)
    ready = threading.Event()

    def watch() -> None:
        with conn.monitor() as m:
            ready.set()
            for _ in range(100_000):  # bounded: the stop marker ends it long before
                command = m.next_command()["command"]
                if _STOP in command:
                    return
                if "ttspool:objects:" in command:
                    seen.append(command.split())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        work()
    finally:
        redis.Redis.from_url(own_broker.url).echo(_STOP)
        thread.join(30)
    assert not thread.is_alive()
    return seen


def test_one_round_trip_looks_up_every_job_of_a_tick(runner: BatchRunner, own_broker: LocalRedis) -> None:
    texts = [f"Cached line number {w}." for w in ("one", "two", "three", "four", "five", "six")]
    first = _requests(texts)
    _run_until_done(runner, first)
    made = _results(runner, first)
    assert not any(r["cached"] for r in made)

    again = _requests(texts)
    commands = _index_commands(own_broker, lambda: _run_until_done(runner, again))
    # One MGET for the six keys; no per-job GET.
    assert [c[0].strip('"').upper() for c in commands] == ["MGET"], commands
    assert len(commands[0]) == 1 + len(texts)
    served = _results(runner, again)
    assert all(r["cached"] for r in served)
    assert [r["url"] for r in served] == [r["url"] for r in made]
    assert [r["duration_s"] for r in served] == [r["duration_s"] for r in made]


def test_a_record_without_its_object_is_synthesized_and_an_object_without_record_is_served(
        runner: BatchRunner, own_broker: LocalRedis, s3: S3Endpoint) -> None:
    gone, unindexed = "The object of this line is deleted.", "The index record of this line is deleted."
    first = _requests([gone, unindexed])
    _run_until_done(runner, first)
    made = _results(runner, first)
    s3.client().delete_object(Bucket=s3.bucket, Key=made[0]["url"].removeprefix(f"s3://{s3.bucket}/"))
    redis.Redis.from_url(own_broker.url).delete("ttspool:objects:" + made[1]["key"])

    again = _requests([gone, unindexed])
    _run_until_done(runner, again)
    served = _results(runner, again)
    assert served[0]["cached"] is False and served[0]["url"] == made[0]["url"]
    assert served[1]["cached"] is True and served[1]["duration_s"] == made[1]["duration_s"]
    assert s3.client().head_object(Bucket=s3.bucket, Key=made[0]["url"].removeprefix(f"s3://{s3.bucket}/"))


def test_a_corrupt_index_record_costs_a_synthesis_not_the_tick(runner: BatchRunner, own_broker: LocalRedis) -> None:
    # Raised out of the tick, a lookup error would requeue every held job, and fail again
    # on each redelivery.
    first = _requests(["A line whose index record gets corrupted."])
    _run_until_done(runner, first)
    [made] = _results(runner, first)
    redis.Redis.from_url(own_broker.url).set("ttspool:objects:" + made["key"], b"{not json")
    again = _requests(["A line whose index record gets corrupted.", "An innocent bystander in the same tick."])
    _run_until_done(runner, again)
    served = _results(runner, again)
    assert served[0]["cached"] is False and served[0]["url"] == made["url"]
    assert served[1]["status"] == "SUCCESS"

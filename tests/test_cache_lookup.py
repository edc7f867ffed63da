"""The worker's cache lookups, in process: BatchRunner against a real Redis, a real S3
endpoint (moto on loopback) and the random-tiny engine. A lookup is one HEAD on the
content key: the object's own metadata says its duration, the broker keeps no index of
objects, an object that is gone is synthesized again, and one stored without the
metadata (by an older worker) is still served."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from storage import storage_for
from tasks.celery_app import make_app
from tasks.cli.local_redis import LocalRedis
from tasks.settings import Settings
from workers.pipeline.runner import BatchRunner
from workers.engine.engine import Engine

from .conftest import Request, S3Endpoint



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


def _set_metadata(s3: S3Endpoint, url: str, metadata: dict[str, str]) -> None:
    """Replace a stored object's metadata (as an older worker, or a hand edit, left it)."""
    key = url.removeprefix(f"s3://{s3.bucket}/")
    s3.client().copy_object(Bucket=s3.bucket, Key=key, CopySource={"Bucket": s3.bucket, "Key": key},
                            Metadata=metadata, MetadataDirective="REPLACE", ContentType="audio/wav")


def test_lookups_read_the_objects_metadata_and_no_broker_index(runner: BatchRunner, own_broker: LocalRedis,
                                                                s3: S3Endpoint) -> None:
    texts = [f"Cached line number {w}." for w in ("one", "two", "three", "four", "five", "six")]
    first = _requests(texts)
    _run_until_done(runner, first)
    made = _results(runner, first)
    assert not any(r["cached"] for r in made)
    hashes = [r["url"].rsplit("/", 1)[-1].split(".")[0] for r in made]
    # No key in the broker names an output: its memory follows the jobs, not the outputs.
    assert not [k for k in redis.Redis.from_url(own_broker.url).scan_iter(count=1000)
                if any(h in k.decode() for h in hashes)]
    # The duration a lookup serves is the object's metadata, not a download of the audio.
    _set_metadata(s3, made[0]["url"], {"duration-s": "1.25", "sample-rate": "24000"})

    again = _requests(texts)
    _run_until_done(runner, again)
    served = _results(runner, again)
    assert all(r["cached"] for r in served)
    assert [r["url"] for r in served] == [r["url"] for r in made]
    assert served[0]["duration_s"] == 1.25
    assert [r["duration_s"] for r in served[1:]] == [r["duration_s"] for r in made[1:]]


def test_a_gone_object_is_synthesized_and_one_without_metadata_is_served(runner: BatchRunner,
                                                                         s3: S3Endpoint) -> None:
    gone, bare = "The object of this line is deleted.", "The metadata of this line is dropped."
    first = _requests([gone, bare])
    _run_until_done(runner, first)
    made = _results(runner, first)
    s3.client().delete_object(Bucket=s3.bucket, Key=made[0]["url"].removeprefix(f"s3://{s3.bucket}/"))
    _set_metadata(s3, made[1]["url"], {})

    again = _requests([gone, bare])
    _run_until_done(runner, again)
    served = _results(runner, again)
    assert served[0]["cached"] is False and served[0]["url"] == made[0]["url"]
    assert served[1]["cached"] is True and served[1]["duration_s"] == made[1]["duration_s"]
    assert s3.client().head_object(Bucket=s3.bucket, Key=made[0]["url"].removeprefix(f"s3://{s3.bucket}/"))


def test_bad_metadata_costs_a_synthesis_not_the_tick(runner: BatchRunner, s3: S3Endpoint) -> None:
    # Raised out of the tick, a lookup error would requeue every held job, and fail again
    # on each redelivery.
    first = _requests(["A line whose metadata gets corrupted."])
    _run_until_done(runner, first)
    [made] = _results(runner, first)
    _set_metadata(s3, made["url"], {"duration-s": "not a number", "sample-rate": "24000"})
    again = _requests(["A line whose metadata gets corrupted.", "An innocent bystander in the same tick."])
    _run_until_done(runner, again)
    served = _results(runner, again)  # both SUCCESS
    assert served[0]["cached"] is False and served[0]["url"] == made["url"]

"""Jobs belong to whoever submitted them (tasks/claims.py): a second tenant, a reused id or
a forged Celery message cannot read or replace another's job."""

from __future__ import annotations

import json
import signal
import uuid
from typing import Iterator

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from tasks.book import book_key, submit_book
from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client
from tasks.schema import JobValidationError, parse_job
from tasks.settings import DEAD_LETTER_KEY, QUEUE_BULK, TASK_NAME

from .conftest import WorkerProc, idle_client
from .fault_tools import until
from .test_submit_crash import _producer


@pytest.fixture()
def idle(redis_server: LocalRedis) -> Iterator[Client]:
    with idle_client(redis_server, 6) as client:
        yield client


def test_an_id_is_its_first_submitters(idle: Client) -> None:
    job = {"text": "Your order ships today.", "job_id": "order-1", "tenant": "alpha"}
    assert idle.submit(job) == "alpha:order-1"  # in alpha's id space
    # The same job again is idempotent: its id back, nothing enqueued twice.
    again = idle.submit_many_report([job])
    assert again.ids == ["alpha:order-1"] and again.new == [] and again.existing == 1
    with pytest.raises(JobValidationError, match="'alpha:order-1' is already taken by a different job"):
        idle.submit_many([{"text": "an innocent bystander"}, {**job, "text": "Your order is cancelled."}])
    assert idle.redis.llen(QUEUE_BULK) == 1  # neither the bystander nor the intruder went in
    # Another tenant's order-1, and one of no tenant, are other jobs: no "taken" to learn
    # from, the same answer as for an id nobody used.
    assert idle.submit_many_report([{**job, "tenant": "beta"}]).new == ["beta:order-1"]
    assert idle.submit_many_report([{k: v for k, v in job.items() if k != "tenant"}]).new == ["order-1"]
    assert idle.owner("alpha:order-1").tenant == "alpha" and idle.owner("beta:order-1").tenant == "beta"
    assert idle.owner("order-1").tenant is None and idle.owner("no-such-job") is None
    with pytest.raises(JobValidationError, match="already taken"):
        idle.submit_many([{"text": "one", "job_id": "twice"}, {"text": "two", "job_id": "twice"}])


@pytest.mark.parametrize("bad", ["alpha:", ":x", "alpha:beta:x", "al pha:x", "-a:x", "a:" + "x" * 129])
def test_a_task_id_names_one_tenant_and_one_id(idle: Client, bad: str) -> None:
    with pytest.raises(JobValidationError, match="a job id is"):
        idle.status(bad)


def test_a_books_segments_are_claimed(idle: Client) -> None:
    book_id = submit_book(idle, "First part. Second part.", segments=["First part.", "Second part."])
    segment = idle.redis.hget(book_key(book_id, "jobs"), "1").decode()
    with pytest.raises(JobValidationError, match="already taken"):
        idle.submit({"text": "Replaced words.", "job_id": segment})


def _forge(client: Client, task_id: str, text: str, **kwargs: object) -> None:
    """A plain Celery client, as any program that can reach the broker could send it."""
    client.app.send_task(TASK_NAME, kwargs={"text": text, **kwargs}, task_id=task_id, queue=QUEUE_BULK)


def test_a_forged_message_cannot_replace_a_job(worker: WorkerProc, client: Client, redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    dead = r.llen(DEAD_LETTER_KEY)
    queued, done = "victim-queued-" + uuid.uuid4().hex, "victim-done-" + uuid.uuid4().hex
    client.wait([client.submit({"text": "The finished original.", "job_id": done})], timeout=120)
    before = client.app.backend.get_task_meta(done)
    client.submit({"text": "The queued original.", "job_id": queued})
    _forge(client, queued, "Forged words.")
    _forge(client, done, "Forged words.")
    # Refused at the envelope (a countdown): its failure must not land on the owner's id.
    client.app.send_task(TASK_NAME, kwargs={"text": "Forged words."}, task_id=queued, queue=QUEUE_BULK, countdown=60)
    victim = client.wait([queued], timeout=120)[0]
    assert victim.status == "SUCCESS" and victim.spoken_text == "The queued original.", victim
    plain = "plain-" + uuid.uuid4().hex  # an id no producer claimed: the worker claims it
    _forge(client, plain, "A plain Celery job.")
    mismatch = "mismatch-" + uuid.uuid4().hex
    _forge(client, mismatch, "Two names.", job_id="another-name")
    # An id in alpha's space sent as beta's job: refused without a trace in alpha's space.
    foreign = "alpha:foreign-" + uuid.uuid4().hex
    _forge(client, foreign, "Forged words.", tenant="beta")
    ok, refused = client.wait([plain, mismatch], timeout=120)
    assert ok.status == "SUCCESS" and client.owner(plain) is not None
    assert refused.status == "FAILURE" and "differs from the message id" in (refused.error or "")
    assert client.status("another-name").status == "PENDING"
    assert client.app.backend.get_task_meta(done) == before
    until("the foreign id's refusal", lambda: r.llen(DEAD_LETTER_KEY) - dead == 4, 60)
    entries = [json.loads(e) for e in r.lrange(DEAD_LETTER_KEY, 0, 3)]
    assert sorted(e["reason"].split(":")[0] for e in entries) == ["eta", "id_scope", "id_taken", "id_taken"]
    assert client.status(foreign).status == "PENDING" and client.owner(foreign) is None
    assert all("Forged words." in e["raw"] or e["reason"].startswith("eta") for e in entries)


@given(st.text(alphabet="<>ab /", min_size=1, max_size=30))
def test_a_job_reads_the_same_when_validated_again(text: str) -> None:
    """The worker validates what the producer sent: the same job, or claims would differ."""
    try:
        spec = parse_job({"text": text})
    except JobValidationError:
        return
    assert parse_job(spec.task_kwargs()) == spec


def test_a_job_whose_producer_died_after_its_claim_runs_on_retry(worker: WorkerProc, client: Client) -> None:
    """Through a real worker: the producer is killed between claim and send; the retry
    sends it, and it runs (tests/test_submit_crash.py shows it is sent once)."""
    job = {"text": "Claimed, then the producer died.", "job_id": "crash-" + uuid.uuid4().hex, "tenant": "alpha"}
    proc = _producer(client, "after_claim", [job])
    try:
        assert proc.wait(timeout=120) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    task = f"alpha:{job['job_id']}"
    assert client.owner(task) is not None and not client.owner(task).sent
    assert client.submit(job) == task
    done = client.wait([task], timeout=120)[0]
    assert done.status == "SUCCESS" and done.spoken_text == job["text"], done

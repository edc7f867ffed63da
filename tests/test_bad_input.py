"""Bad input on the broker and at the producer: a clear reason, and nothing else affected.

Broker-side messages are written straight onto the Redis list, the way a buggy or
hostile client in any language could; the shared worker must record a FAILURE with a
reason where the message names a job id, and keep serving either way. Producer-side
field checks live in tests/test_scheduler.py (schema) and tests/test_pipeline.py (CLI).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tasks.producer import Client
from tasks.schema import JobValidationError, parse_job
from tasks.settings import DEAD_LETTER_KEY, QUEUE_BULK, QUEUE_REALTIME, TASK_NAME, Settings

from .conftest import WorkerProc, raw_message

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _body(*parts: Any) -> bytes:
    return json.dumps(list(parts)).encode()


def test_broken_broker_messages_fail_with_a_reason_and_the_worker_keeps_serving(
        worker: WorkerProc, client: Client, redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    huge_text = "x" * (16 * 1024 * 1024)
    cases: dict[str, tuple[bytes, str, str]] = {
        # name: (body, content type, what the recorded reason must say)
        "malformed json": (b'[[], {"text": "unterminated', "application/json", "MessageRejected"),
        "kwargs missing": (_body([]), "application/json", "[args, kwargs, embed]"),
        "kwargs not an object": (_body([], "just a string", _EMBED), "application/json", "[args, kwargs, embed]"),
        "body not a list": (json.dumps({"text": "hi"}).encode(), "application/json", "[args, kwargs, embed]"),
        "huge body": (_body([], {"text": huge_text}, _EMBED), "application/json", "longer than"),
        "yaml": (b"text: hi\n", "application/x-yaml", "JSON"),
    }
    ids = {name: f"bad-{i}-{uuid.uuid4().hex}" for i, name in enumerate(cases)}
    # Not even envelopes: no id to report a failure against, but they must not stop the worker.
    not_envelopes = (b"\x80\x04garbage that is not JSON", b"[1, 2, 3]", b'{"body": "x", "headers": {"id": "nope"}}',
                     json.dumps({"body": "%%%", "properties": {"delivery_tag": "t", "body_encoding": "base64"}}))
    dead_before = r.llen(DEAD_LETTER_KEY)
    for garbage in not_envelopes:
        r.lpush(QUEUE_BULK, garbage)
    for name, (body, ctype, _) in cases.items():
        r.lpush(QUEUE_BULK, raw_message(ids[name], body, ctype))
    unknown = "unknown-" + uuid.uuid4().hex
    r.lpush(QUEUE_BULK, raw_message(unknown, _body([], {"text": "hi"}, _EMBED), task="ttspool.synthesise"))

    results = dict(zip(cases, client.wait(list(ids.values()), timeout=120)))
    for name, (_, _, reason) in cases.items():
        st_ = results[name]
        assert st_.status == "FAILURE" and reason in (st_.error or ""), (name, st_)
        assert len(st_.error or "") < 1000 and "\n" not in (st_.error or ""), (name, "reason must be one short line")
    assert "NotRegistered" in (client.wait([unknown], timeout=60)[0].error or "")
    after = client.wait([client.submit({"text": "Still serving after broken messages."})], timeout=120)[0]
    assert after.status == "SUCCESS" and worker.proc.poll() is None
    # Each was dead-lettered once: none went back on the queue to be popped again.
    assert r.llen(DEAD_LETTER_KEY) - dead_before == len(not_envelopes)
    assert r.llen(QUEUE_BULK) == 0
    assert huge_text[:100_000] not in worker.log_text()  # a huge body is not copied into the log


def _poison(job_id: Any, drop: tuple[str, ...] = (), **headers: Any) -> str:
    envelope = json.loads(raw_message("placeholder", _body([], {"text": "poison"}, _EMBED)))
    envelope["headers"].update(id=job_id, **headers)
    for name in drop:
        envelope["headers"].pop(name, None)
    return json.dumps(envelope)


def _canaries(client: Client, n: int = 3) -> None:
    ids = client.submit_many([{"text": f"Canary number {i}."} for i in range(n)])
    assert [s.status for s in client.wait(ids, timeout=120)] == ["SUCCESS"] * n


def _settled(r: redis.Redis) -> bool:
    """Nothing left on the queue, nothing unacked (an ack follows its recorded result)."""
    deadline = time.monotonic() + 15
    while r.llen(QUEUE_BULK) or r.hlen("unacked"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _healthz(worker: WorkerProc) -> int:
    url = f"http://127.0.0.1:{worker.settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_poison_envelopes_are_dead_lettered_and_hold_no_slot(worker: WorkerProc, client: Client, redis_server) -> None:
    """Each of these stopped a worker (or every slot of it) before: an id that is a list,
    an integer or a lone surrogate; a queue item nested 100,000 deep; 16 envelopes
    without an id (the prefetch is 2 x max_batch); 20 jobs with an hour's countdown."""
    r = redis.Redis.from_url(redis_server.url)
    dead_before = r.llen(DEAD_LETTER_KEY)
    unnamed = [_poison(["a", "list"]), _poison(7), _poison("\ud800surrogate"), "[" * 100_000]
    unnamed += [_poison(None) for _ in range(16)]
    for item in unnamed:
        r.lpush(QUEUE_BULK, item)
    # A plain Celery client's countdown, as any producer could send it.
    later = [f"later-{i}-{uuid.uuid4().hex}" for i in range(20)]
    for job_id in later:
        client.app.send_task(TASK_NAME, kwargs={"text": "in an hour"}, task_id=job_id, queue=QUEUE_BULK, countdown=3600)
    wrong = f"wrong-header-{uuid.uuid4().hex}"
    r.lpush(QUEUE_BULK, _poison(wrong, retries="three"))
    _canaries(client, 10)
    refused = client.wait(later + [wrong], timeout=60)
    assert all(s.status == "FAILURE" and "countdown" in (s.error or "") for s in refused[:-1]), refused[0]
    assert "headers.retries" in (refused[-1].error or "")
    assert r.llen(DEAD_LETTER_KEY) - dead_before == len(unnamed)
    entry = json.loads(r.lindex(DEAD_LETTER_KEY, 0))
    assert entry["reason"].startswith(("bad_id", "no_id", "undecodable")) and len(entry["raw"]) <= 2048
    assert _settled(r)
    assert worker.proc.poll() is None and _healthz(worker) == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.metrics_port}/metrics", timeout=5).read()
    assert b'ttspool_rejected_messages_total{reason="eta"} 20.0' in metrics


envelope_ids = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | st.lists(st.integers(), max_size=2)
header_values = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.lists(st.none(), max_size=2) | st.dictionaries(st.text(max_size=4), st.none(), max_size=2)
envelopes = st.one_of(
    st.builds(lambda i, d, h: _poison(i, tuple(d), **h), envelope_ids,
              st.sets(st.sampled_from(["id", "task", "lang", "root_id", "retries", "argsrepr"]), max_size=3),
              st.dictionaries(st.sampled_from(["task", "eta", "expires", "retries", "timelimit", "root_id", "lang", "stamps",
                                               "group_index", "x-extra"]),
                              header_values | st.integers(1, 5).map(lambda n: "x" * (n * 200_000)), max_size=4)),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.integers(1, 50_000).map(lambda n: "{\"a\":" * n),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(item=envelopes)
def test_fuzzed_envelopes_never_stop_the_worker(item: str, worker: WorkerProc, client: Client, redis_server) -> None:
    """Whatever lands on the queue, a canary behind it succeeds and nothing stays unacked."""
    r = redis.Redis.from_url(redis_server.url)
    r.lpush(QUEUE_BULK, item)
    _canaries(client, 1)
    assert worker.proc.poll() is None and _settled(r)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)
known = st.fixed_dictionaries({"text": st.text(max_size=60)}, optional={
    "voice": st.integers(-5, 2**32) | st.text(max_size=20), "seed": json_scalars, "speed": st.integers(-2, 12),
    "temperature": st.floats(), "top_p": st.floats(), "top_k": st.integers(-1, 700), "max_tokens": st.integers(-1, 3000),
    "priority": st.sampled_from(["realtime", "bulk", "urgent", ""]), "job_id": st.text(max_size=140),
    "ttl_s": json_scalars, "expires_at": json_scalars, "tenant": st.text(max_size=70),
})
# Unknown fields (long, multi-line, any characters) in some of the jobs.
unknown = st.just({}) | st.dictionaries(st.text(min_size=1, max_size=300), json_values, max_size=2)
job_like = st.tuples(known, unknown).map(lambda kv: {**kv[1], **kv[0]})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=job_like)
@example(job={"text": "hi", "evil\nfield" * 500: 1})
@example(job={"text": "hi", **{f"field{i}" * 9: i for i in range(5000)}})
def test_fuzzed_jobs_enqueue_intact_or_fail_with_one_readable_line(job: dict[str, Any], redis_server) -> None:
    """Through the real producer into a Redis database no worker reads: a job either
    raises JobValidationError (one line, bounded, no echo of a long value) and enqueues
    nothing, or lands on its queue as JSON the worker's validator accepts as the same job."""
    db = redis_server.url.rsplit("/", 1)[0] + "/7"
    c = Client(Settings(broker_url=db))
    r = redis.Redis.from_url(db)
    try:
        try:
            [job_id] = c.submit_many([job])
        except JobValidationError as err:
            msg = str(err)
            assert "\n" not in msg and len(msg) < 2000, msg
            assert r.llen(QUEUE_BULK) + r.llen(QUEUE_REALTIME) == 0
            return
        [raw] = r.lrange(QUEUE_REALTIME if job.get("priority") == "realtime" else QUEUE_BULK, 0, -1)
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json" and envelope["headers"]["id"] == job_id
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert args == [] and parse_job(kwargs) == parse_job(job).model_copy(update={"enqueued_at": kwargs["enqueued_at"]})
    finally:
        r.flushdb()
        c.close()

"""The worker's parts one by one, in process: admission, the table of held work, the
store stage and refills through the planner, against a real Redis (its own) and a real
local store, with a fake engine whose rows end when the test says (their length is the
number of words of their text), so which row ends when is known exactly."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from storage.local import LocalStorage
from tasks import job_records
from tasks.claims import Claim, claim_key, digest_of
from tasks.cli.local_redis import LocalRedis
from tasks.settings import DEAD_LETTER_KEY
from workers.pipeline.jobs import IllegalMove, Job, Outcome, Phase
from workers.pipeline.runner import BatchRunner

from .conftest import Request
from .runner_parts import FakeEngine, Sent, make_runner, offered


@pytest.fixture
def parts(own_broker: LocalRedis, tmp_path: Path) -> Iterator[tuple[BatchRunner, FakeEngine]]:
    runner, engine = make_runner(own_broker, tmp_path / "store")
    yield runner, engine
    runner.close()


def job(words: int, **kwargs: Any) -> Request:
    # Letters only: the text front-end would read digits out as more words.
    word = "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:6])
    return Request(f"job-{uuid.uuid4().hex[:12]}", {"text": " ".join([word] * words), **kwargs})


def status(runner: BatchRunner, req: Request) -> dict[str, Any]:
    return runner.app.backend.get_task_meta(req.id)


# -- job phases ------------------------------------------------------------------------


def test_a_job_moves_only_between_phases_that_follow_each_other() -> None:
    j = Job("j", None, {})  # type: ignore[arg-type]
    for to in (Phase.READY, Phase.RUNNING, Phase.STORING, Phase.FINISHED):
        j.move(to)
    assert j.done
    with pytest.raises(IllegalMove, match="finished -> running"):
        j.move(Phase.RUNNING)
    with pytest.raises(IllegalMove, match="admitted -> storing"):
        Job("k", None, {}).move(Phase.STORING)  # type: ignore[arg-type]


# -- admission -------------------------------------------------------------------------


def test_admission_admits_valid_jobs_and_ends_the_others_alone(parts: tuple[BatchRunner, FakeEngine],
                                                               own_broker: LocalRedis) -> None:
    runner, _ = parts
    r = redis.Redis.from_url(own_broker.url)
    good, bad, mismatch, struck, taken = job(3), job(3, speed=99), job(3), job(3), job(3)
    mismatch.kwargs["job_id"] = "someone-else"
    r.set(f"ttspool:strikes:{struck.id}", runner.settings.max_strikes)
    r.set(claim_key(taken.id), Claim("another-digest", None, "producer").encode())
    out = Outcome()
    admitted = runner.admission.admit([good, bad, mismatch, struck, taken], out)
    assert [j.id for j in admitted] == [good.id] and admitted[0].phase is Phase.ADMITTED
    assert out.finished == {bad.id, mismatch.id, struck.id, taken.id}
    assert status(runner, good)["status"] == "STARTED"
    assert status(runner, bad)["status"] == "FAILURE"
    assert status(runner, struck)["status"] == "FAILURE"
    assert any(json.loads(x)["id"] == struck.id for x in r.lrange(DEAD_LETTER_KEY, 0, -1))
    assert status(runner, taken)["status"] == "PENDING"  # the owner's record is not touched


def test_admission_does_not_run_a_redelivery_whose_result_is_recorded(parts: tuple[BatchRunner, FakeEngine]) -> None:
    runner, engine = parts
    req = job(2)
    assert runner([req]).finished == {req.id}
    again = runner.admission.admit([Request(req.id, dict(req.kwargs))], out := Outcome())
    assert again == [] and out.finished == {req.id}
    assert len(engine.batches) == 1


# -- the table of held work ----------------------------------------------------------


def test_held_jobs_with_the_same_output_share_one_row_and_a_stored_output_is_served(
        parts: tuple[BatchRunner, FakeEngine]) -> None:
    runner, engine = parts
    a = job(2, seed=5)
    b = Request(f"job-{uuid.uuid4().hex[:12]}", dict(a.kwargs))
    assert runner([a, b]).finished == {a.id, b.id}
    assert engine.batches == [[a.kwargs["text"]]]
    assert status(runner, a)["result"]["url"] == status(runner, b)["result"]["url"]

    c = Request(f"job-{uuid.uuid4().hex[:12]}", dict(a.kwargs))
    assert runner([c]).finished == {c.id}
    assert len(engine.batches) == 1 and status(runner, c)["result"]["cached"] is True


def test_a_job_past_its_deadline_is_expired_without_the_gpu(parts: tuple[BatchRunner, FakeEngine]) -> None:
    runner, engine = parts
    late = job(2, ttl_s=1, enqueued_at=1_000_000_000.0)
    assert runner([late]).finished == {late.id}
    assert engine.batches == [] and status(runner, late)["status"] == "FAILURE"
    assert "deadline" in str(status(runner, late)["result"])


# -- retention -----------------------------------------------------------------------


def test_every_ended_job_has_a_durable_record_and_its_redis_keys_last_the_result_window(
        own_broker: LocalRedis, tmp_path: Path) -> None:
    runner, engine = make_runner(own_broker, tmp_path / "store", TTSPOOL_RESULT_TTL="120")
    r = redis.Redis.from_url(own_broker.url)
    ok, bad, late = job(2, seed=3, tenant="acme"), job(2, speed=99), job(2, ttl_s=1, enqueued_at=1_000_000_000.0)
    sent = time.time()
    r.set(claim_key(ok.id), Claim(digest_of(ok.kwargs), "acme", "producer").encode(), ex=30)  # as a producer claims, hours ago
    twin = Request(f"job-{uuid.uuid4().hex[:12]}", dict(ok.kwargs))
    try:
        assert runner([ok, bad, late]).finished == {ok.id, bad.id, late.id}
        assert runner([twin]).finished == {twin.id} and len(engine.batches) == 1  # served from storage
        store = runner.recorder.storage
        records = {req.id: job_records.read(store, req.id) for req in (ok, bad, late, twin)}
        rec = records[ok.id]
        assert rec is not None and rec["status"] == "SUCCESS" and rec["params"]["tenant"] == "acme"
        result = status(runner, ok)["result"]
        shared = ("url", "duration_s", "sample_rate", "format", "spoken_text", "cached")
        assert {k: rec[k] for k in shared} == {k: result[k] for k in shared}
        # Redis keeps only what status needs: the key is the URL's tail, the id the key's.
        assert set(result) == set(shared) and rec["url"].endswith("/" + rec["key"])
        assert sent <= rec["started_at"] <= rec["finished_at"] <= time.time() and rec["cached"] is False
        assert records[twin.id]["cached"] is True and records[twin.id]["key"] == rec["key"]  # type: ignore[index]
        assert records[bad.id]["status"] == "FAILURE" and "speed" in records[bad.id]["error"]  # type: ignore[index]
        assert records[late.id]["status"] == "EXPIRED" and records[late.id]["enqueued_at"] == 1_000_000_000.0  # type: ignore[index]
        # What this left in Redis, a result and a claim per job, goes with the result
        # window (the claim renewed); an output, a delivery count or strikes leave nothing.
        mine = [ok.id, bad.id, late.id, twin.id, rec["key"].rsplit("/", 1)[-1].split(".")[0]]
        keys = sorted(k.decode() for k in r.scan_iter(count=1000) if any(m in k.decode() for m in mine))
        assert keys == sorted([*(f"celery-task-meta-{j}" for j in mine[:4]), *(claim_key(j) for j in mine[:4])])
        assert all(0 < r.ttl(k) <= 120 for k in keys), {k: r.ttl(k) for k in keys}
        assert r.ttl(claim_key(ok.id)) > 60
    finally:
        runner.close()


# -- the store stage and refills -----------------------------------------------------


def test_each_row_is_acked_as_its_audio_is_stored_not_when_the_batch_ends(
        parts: tuple[BatchRunner, FakeEngine]) -> None:
    runner, engine = parts
    short, long = job(1), job(6)
    acked: list[str] = []
    seen_at_step: dict[int, list[str]] = {}
    stored = threading.Event()
    offered(runner).on_settle = lambda job_id: (acked.append(job_id), stored.set())

    def after_step(step: int) -> None:
        if step == 0:
            # The short row ended on step 0; the batch runs on until step 5.
            assert stored.wait(10), "the short row was not stored and acked while the batch ran"
        seen_at_step[step] = list(acked)

    engine.after_step = after_step
    out = runner([short, long])
    assert seen_at_step[0] == [short.id] and seen_at_step[4] == [short.id]
    assert acked == [short.id, long.id] and out.finished == {short.id, long.id}
    assert status(runner, short)["status"] == "SUCCESS"


def test_slow_storage_holds_the_gpu_back_instead_of_buffering_audio(own_broker: LocalRedis, tmp_path: Path) -> None:
    # One store thread, room for two rows (the batch's size) between the stages.
    runner, engine = make_runner(own_broker, tmp_path / "store", TTSPOOL_STORE_THREADS="1")
    gate = threading.Event()
    writes: list[str] = []
    real_put = LocalStorage.put_bytes

    def slow_put(self: LocalStorage, key: str, data: bytes, content_type: str = "", metadata: Any = None) -> str:
        writes.append(key)
        assert gate.wait(30)
        return real_put(self, key, data, content_type, metadata)

    steps: list[int] = []
    engine.after_step = steps.append
    reqs = [job(1) for _ in range(4)]
    thread = threading.Thread(target=lambda: runner(reqs))
    try:
        LocalStorage.put_bytes = slow_put  # type: ignore[method-assign]
        thread.start()
        # Step 0 ends two rows: one is being stored, one waits; the free rows are refilled
        # and end on step 1, and handing the first of them over blocks the GPU thread.
        thread.join(1.5)
        assert thread.is_alive() and steps == [0] and len(writes) == 1
        gate.set()
        thread.join(30)
        # Each job's audio, then its durable record.
        assert not thread.is_alive() and steps == [0, 1] and len(writes) == 8
        assert sum(w.startswith("audio/") for w in writes) == sum(w.startswith("records/") for w in writes) == 4
        assert runner.metrics.store_wait_seconds._value.get() > 1.0
    finally:
        gate.set()
        thread.join(30)
        LocalStorage.put_bytes = real_put  # type: ignore[method-assign]
        runner.close()


def test_free_rows_are_refilled_by_the_planner_realtime_first(parts: tuple[BatchRunner, FakeEngine]) -> None:
    runner, engine = parts  # two rows
    first, long = job(1), job(8)
    backlog = [job(3) for _ in range(2)]
    rt = job(2, priority="realtime")
    # Messages that arrive while the batch runs: the bulk backlog first, then a realtime job.
    offered(runner).offered = [[*backlog, rt]]
    out = runner([first, long])
    [rows] = engine.batches
    # The row `first` frees on step 0 goes to the realtime job, ahead of the older bulk
    # backlog; the backlog follows as rows free up, in the same batch.
    assert rows[:3] == [first.kwargs["text"], long.kwargs["text"], rt.kwargs["text"]]
    assert sorted(rows[3:]) == sorted(b.kwargs["text"] for b in backlog)
    assert out.finished == {first.id, long.id, rt.id, *(b.id for b in backlog)}
    assert all(status(runner, r)["status"] == "SUCCESS" for r in (first, long, rt, *backlog))


def test_with_refill_off_the_batch_keeps_its_rows(own_broker: LocalRedis, tmp_path: Path) -> None:
    runner, engine = make_runner(own_broker, tmp_path / "store", TTSPOOL_REFILL="0")
    try:
        out = runner([job(1), job(4), job(2)])
        assert len(engine.batches) == 1 and len(engine.batches[0]) == 2 and len(out.finished) == 2
    finally:
        runner.close()


def test_a_job_arriving_with_the_output_of_a_running_row_shares_it(parts: tuple[BatchRunner, FakeEngine]) -> None:
    runner, engine = parts
    running = job(4, seed=9)
    twin = Request(f"job-{uuid.uuid4().hex[:12]}", dict(running.kwargs))
    offered(runner).offered = [[twin]]
    out = runner([running])
    assert engine.batches == [[running.kwargs["text"]]]
    assert out.finished == {running.id, twin.id}
    assert status(runner, twin)["result"]["url"] == status(runner, running)["result"]["url"]
    assert status(runner, twin)["result"]["cached"] is False


def test_storage_down_requeues_the_batch_with_one_try_and_says_so_in_task_events(
        own_broker: LocalRedis, tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "audio").write_bytes(b"")  # a file where the audio folder must go: every write fails
    events = Sent()
    runner, engine = make_runner(own_broker, root, events, TTSPOOL_UPLOAD_RETRY_S="0", TTSPOOL_STORE_THREADS="1")
    sent = events.sent
    backlog = [job(3) for _ in range(3)]
    offered(runner).offered = [backlog]
    def tries() -> float:
        """Uploads tried (the upload timer observes failed ones too)."""
        return next(x.value for m in runner.metrics.upload_seconds.collect() for x in m.samples
                    if x.name.endswith("_count"))

    def after_step(step: int) -> None:
        # The GPU does not wait for storage: let the store stage find it down first.
        for _ in range(200):
            if tries() >= 1:
                break
            time.sleep(0.05)
        time.sleep(0.2)

    engine.after_step = after_step
    try:
        first, second = job(1), job(1)
        out = runner([first, second])
        # Both rows ended on step 0: the first used the batch's one try, the second went
        # back untried; with storage known down, the batch took none of the backlog.
        assert tries() == 1
        assert engine.batches == [[first.kwargs["text"], second.kwargs["text"]]]
        assert out.requeue == {first.id, second.id} and not out.finished
        assert all(status(runner, r)["status"] == "PENDING" for r in (first, second))
        retried = [f["uuid"] for t, f in sent if t == "task-retried"]
        assert sorted(retried) == sorted([first.id, second.id])
        assert not any(t == "task-succeeded" for t, _ in sent)
        # The backlog was not even taken in: it stays held for the next batch.
        assert offered(runner).offered == [backlog]
    finally:
        runner.close()


@pytest.mark.parametrize("realtime_rows", [2, 0])
def test_a_realtime_job_joins_a_batch_full_of_bulk_rows_at_its_next_step(
        own_broker: LocalRedis, tmp_path: Path, realtime_rows: int) -> None:
    runner, engine = make_runner(own_broker, tmp_path / "store", TTSPOOL_REALTIME_ROWS=str(realtime_rows))
    bulk = [job(6), job(6), job(6)]
    rt = job(1, priority="realtime")
    offered(runner).offered = [[rt]]
    joined_at: dict[str, int] = {}

    def after_step(step: int) -> None:
        # Refills come after this: a row first seen at step n joined after step n - 1.
        for text in engine.batches[-1]:
            joined_at.setdefault(text, step)

    engine.after_step = after_step
    try:
        out = runner(bulk)
        # Two bulk rows fill max_batch; the third bulk job waits for one of them either way.
        if realtime_rows:
            # Offered after step 0; its storage lookup is back after step 1; it joins then,
            # into a kept row.
            assert rt.id in out.finished and joined_at[rt.kwargs["text"]] == 2
            # In the express lane: it steps alone while the bulk rows wait (Engine.stream).
            assert engine.express[rt.kwargs["text"]] and not any(engine.express[b.kwargs["text"]] for b in bulk)
        else:
            # No row for it until the bulk rows end (six words: step 5).
            assert joined_at.get(rt.kwargs["text"], 6) >= 6
        held = [r for r in [*bulk, rt] if r.id not in out.finished]
        for _ in range(5):
            if held:
                held = [r for r in held if r.id not in runner(held).finished]
        assert not held and status(runner, rt)["status"] == "SUCCESS"
    finally:
        runner.close()


def test_nothing_joins_a_suspect_batch_and_a_batch_stops_taking_rows_after_its_window(
        parts: tuple[BatchRunner, FakeEngine], own_broker: LocalRedis) -> None:
    runner, engine = parts
    suspect, other = job(3), job(1)
    # It was in a batch the worker died in: it runs alone, and no refill joins it there.
    redis.Redis.from_url(own_broker.url).set(f"ttspool:strikes:{suspect.id}", 1)
    offered(runner).offered = [[other]]
    assert runner([suspect]).finished == {suspect.id}
    assert engine.batches == [[suspect.kwargs["text"]]] and offered(runner).offered == [[other]]

    runner.policy = replace(runner.policy, refill_window_s=1e-9)
    first = job(3)
    assert runner([first]).finished == {first.id}
    assert engine.batches[-1] == [first.kwargs["text"]] and offered(runner).offered == [[other]]

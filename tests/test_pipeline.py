"""End to end: producer -> Redis -> real worker (real engine, random-tiny) -> S3 -> result."""

from __future__ import annotations

import io
import json
import random
import string
import subprocess
import sys
import uuid

import redis
import soundfile as sf

from tasks.celery_app import make_app
from tasks.producer import Client
from tasks.schema import AUDIO_FORMATS, JobValidationError
from tasks.settings import QUEUE_BULK, QUEUE_REALTIME, TASK_NAME, Settings
from tasks.text.lengths import predicted_steps
from tasks.audio import FORMATS

from .conftest import BUCKET, PREFIX, ROOT, S3Endpoint, WorkerProc, raw_message
from .model_facts import steps_to_samples
from .scrape import fetch, parse, value

STATUS_FIELDS = {"id", "status", "url", "duration_s", "sample_rate", "error", "spoken_text", "format", "dropped", "voice"}


def _cli(worker: WorkerProc, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=ROOT, env=worker.env,
                          capture_output=True, text=True, timeout=timeout)


def _fetch_wav(s3: S3Endpoint, url: str) -> tuple[object, bytes]:
    assert url.startswith(f"s3://{BUCKET}/{PREFIX}/audio/"), url
    key = url.removeprefix(f"s3://{BUCKET}/")
    data = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return sf.info(io.BytesIO(data)), data


def _expected_frames(text: str, speed: int = 5) -> int:
    # random-tiny's length is predicted from the text (ASCII text normalizes to itself).
    return steps_to_samples(predicted_steps(text, speed))


def test_cli_submit_wait_json_stores_wav_in_s3(worker: WorkerProc, s3: S3Endpoint) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    out = _cli(worker, "submit", text, "--voice", "5", "--seed", "9", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert set(status) == STATUS_FIELDS
    assert status["status"] == "SUCCESS" and status["error"] is None
    info, _ = _fetch_wav(s3, status["url"])
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames == _expected_frames(text)
    assert abs(status["duration_s"] - info.frames / 24000) < 1e-4
    assert status["sample_rate"] == 24000

    again = _cli(worker, "status", status["id"], "--json")
    assert json.loads(again.stdout) == status


def test_cli_submit_prints_id_and_json_id(worker: WorkerProc) -> None:
    plain = _cli(worker, "submit", "Plain id please.", "--job-id", "cli-plain-1")
    assert plain.returncode == 0 and plain.stdout.strip() == "cli-plain-1"
    as_json = _cli(worker, "submit", "Json id please.", "--json")
    assert as_json.returncode == 0 and set(json.loads(as_json.stdout)) == {"id"}


def test_python_api_many_jobs_mixed_voices_and_priorities(client: Client, s3: S3Endpoint) -> None:
    texts = ["Short one.", "A somewhat longer sentence for the second job in this batch.",
             "Third job, realtime.", "欢迎使用语音合成服务。"]
    jobs = [{"text": t, "voice": i + 1, "seed": 100 + i, "priority": "realtime" if i == 2 else "bulk"}
            for i, t in enumerate(texts)]
    ids = client.submit_many(jobs)
    results = client.wait(ids, timeout=180)
    for text, st in zip(texts, results):
        assert st.status == "SUCCESS", st
        info, _ = _fetch_wav(s3, st.url)
        assert info.samplerate == 24000 and info.channels == 1
        assert abs(st.duration_s - info.frames / 24000) < 1e-4
        if text.isascii():
            assert info.frames == _expected_frames(text)
    assert len({st.url for st in results}) == len(texts)


def test_alone_and_batched_give_same_duration_and_audio(client: Client, s3: S3Endpoint) -> None:
    short = {"text": "Batch invariance check.", "voice": 42, "seed": 4242}
    alone = client.wait([client.submit(short)], timeout=120)[0]
    info_alone, wav_alone = _fetch_wav(s3, alone.url)

    # Remove the stored output so the same content is synthesized again,
    # this time in one batch with much longer jobs.
    key = alone.url.removeprefix(f"s3://{BUCKET}/")
    s3.client().delete_object(Bucket=BUCKET, Key=key)
    long_text = "This is a long passage that keeps going for quite a while, " * 8
    ids = client.submit_many([{"text": long_text, "voice": v, "seed": v} for v in (1, 2, 3)] + [short])
    batched = client.wait(ids, timeout=300)[-1]
    info_batched, wav_batched = _fetch_wav(s3, batched.url)
    assert batched.url == alone.url
    assert info_batched.frames == info_alone.frames
    a, _ = sf.read(io.BytesIO(wav_alone), dtype="int16")
    b, _ = sf.read(io.BytesIO(wav_batched), dtype="int16")
    assert abs(a.astype(int) - b.astype(int)).max() <= 33  # within 1e-3 of full scale


def test_duplicates_share_one_output(worker: WorkerProc, client: Client) -> None:
    metrics = f"http://127.0.0.1:{worker.env['TTSPOOL_METRICS_PORT']}/metrics"

    def syntheses() -> float:
        return value(parse(fetch(metrics)[1]), "ttspool_batch_size_sum") or 0.0

    before = syntheses()
    job = {"text": f"Same request twice, {uuid.uuid4().hex[:8]}.", "voice": 3, "seed": 3}
    first, second = client.wait(client.submit_many([job, job]), timeout=120)
    assert first.status == second.status == "SUCCESS"
    assert first.url == second.url and first.id != second.id
    # Both map to one key and URL even without deduplication: what it saves is the GPU work.
    assert syntheses() - before == 1


def test_producer_refuses_invalid_jobs_and_enqueues_nothing(worker: WorkerProc, redis_server) -> None:
    cases = [
        ("", "text"),
        ("   ", "text"),
        ("x" * 2001, "text"),
    ]
    for text, field in cases:
        out = _cli(worker, "submit", text)
        assert out.returncode == 2 and field in out.stderr and out.stderr.count("\n") == 1, out.stderr
    bad_speed = _cli(worker, "submit", "hello", "--speed", "10")
    assert bad_speed.returncode == 2 and "speed" in bad_speed.stderr
    bad_priority = _cli(worker, "submit", "hello", "--priority", "urgent")
    assert bad_priority.returncode == 2

    # A broker database no worker reads from, so the queue length is observable.
    idle = worker.settings.override(broker_url=redis_server.url.rsplit("/", 1)[0] + "/5")
    c = Client(idle)
    r = redis.Redis.from_url(idle.broker_url)
    try:
        for bad in ({"text": "ok"}, {"text": ""}), ({"text": "ok", "priority": "urgent"},), ({"text": "ok", "speed": 11},):
            try:
                c.submit_many(list(bad))
            except JobValidationError:
                pass
            else:
                raise AssertionError(f"{bad} was accepted")
        assert r.llen(QUEUE_BULK) == 0 and r.llen(QUEUE_REALTIME) == 0
        c.submit({"text": "ok", "priority": "realtime"})
        assert r.llen(QUEUE_REALTIME) == 1  # the check above could have failed
    finally:
        r.flushdb()
        c.close()


def test_worker_fails_bad_messages_alone_and_keeps_serving(worker: WorkerProc, client: Client) -> None:
    app = make_app(worker.settings)
    tid = lambda: uuid.uuid4().hex  # noqa: E731
    bad = {
        "empty": (tid(), {"kwargs": {"text": ""}}),
        "speed": (tid(), {"kwargs": {"text": "hi", "speed": 42}}),
        "unknown": (tid(), {"kwargs": {"text": "hi", "volume": 11}}),
        "positional": (tid(), {"args": ["hi"], "kwargs": {}}),
        "missing": (tid(), {"kwargs": {}}),
        "voice": (tid(), {"kwargs": {"text": "hi", "voice": "definitely not a speaker"}}),
    }
    good_id = tid()
    for job_id, body in bad.values():
        app.send_task(TASK_NAME, args=body.get("args"), kwargs=body["kwargs"], task_id=job_id, queue=QUEUE_BULK)
    app.send_task(TASK_NAME, kwargs={"text": "The good job in a bad batch."}, task_id=good_id, queue=QUEUE_BULK)
    pickled_id = tid()
    app.send_task(TASK_NAME, kwargs={"text": "pickled"}, task_id=pickled_id, queue=QUEUE_BULK, serializer="pickle")

    results = {name: st for name, st in zip(bad, client.wait([i for i, _ in bad.values()], timeout=120))}
    for name, field in [("empty", "text"), ("speed", "speed"), ("unknown", "volume"),
                        ("positional", "keyword"), ("missing", "text"), ("voice", "voice")]:
        assert results[name].status == "FAILURE" and field in results[name].error, (name, results[name])
    assert client.wait([good_id], timeout=120)[0].status == "SUCCESS"
    pickled = client.wait([pickled_id], timeout=60)[0]
    assert pickled.status == "FAILURE" and "JSON" in pickled.error
    after = client.wait([client.submit({"text": "Still serving after bad input."})], timeout=120)[0]
    assert after.status == "SUCCESS" and worker.proc.poll() is None
    app.close()


def test_non_python_client_raw_json_message_is_served(worker: WorkerProc, client: Client, redis_server) -> None:
    """What a Node or Go Celery client puts on the Redis list: protocol 2, JSON, base64 body."""
    job_id = "raw-" + uuid.uuid4().hex
    body = json.dumps([[], {"text": "Sent without Python.", "voice": 8}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    redis.Redis.from_url(redis_server.url).lpush(QUEUE_BULK, raw_message(job_id, body.encode()))
    st = client.wait([job_id], timeout=120)[0]
    assert st.status == "SUCCESS" and st.url.endswith(".wav")


def test_no_pickle_accepted_anywhere() -> None:
    app = make_app(Settings())
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    app.close()


def test_jobs_past_their_deadline_expire_without_the_gpu(client: Client) -> None:
    import time

    tag = uuid.uuid4().hex[:8]
    late = client.submit({"text": f"Too late {tag}.", "expires_at": time.time() - 1})
    short_ttl = client.submit({"text": f"Short lived {tag}.", "ttl_s": 0.001})
    fine = client.submit({"text": f"In time {tag}.", "ttl_s": 600, "max_tokens": 40})
    done = client.wait([late, short_ttl, fine], timeout=120)
    assert [s.status for s in done] == ["EXPIRED", "EXPIRED", "SUCCESS"]
    assert done[0].error is not None and done[0].error.startswith("JobExpired: deadline passed")
    # Plain Celery clients see an ended task (a FAILURE), not one that never ends.
    assert client.app.AsyncResult(late).state == "FAILURE"


def _letters() -> str:
    """A random word without digits (digits would be read out too)."""
    return "".join(random.choices(string.ascii_lowercase, k=10))


def test_numbers_are_spoken_and_reach_the_prompt(worker: WorkerProc, client: Client, s3: S3Endpoint) -> None:
    """Money, a date and a phone number through a real worker: the recorded spoken_text
    holds the words, and the prompt the engine builds from it holds their tokens."""
    from workers.engine.engine import Engine
    from workers.engine.requests import SynthRequest

    tag = _letters()
    text = f"Order {tag}: your balance is $1,234.56, due on 12/03/2026. Call 555-0123."
    [st] = client.wait([client.submit({"text": text, "voice": 4})], timeout=120)
    assert st.status == "SUCCESS", st.error
    words = ("one thousand two hundred thirty four dollars and fifty six cents",
             "December third, twenty twenty six", "five five five, zero one two three")
    assert st.spoken_text is not None and all(w in st.spoken_text for w in words), st.spoken_text
    assert not any(ch.isdigit() for ch in st.spoken_text)
    out = _cli(worker, "status", st.id, "--json")
    assert json.loads(out.stdout)["spoken_text"] == st.spoken_text
    # The worker's length prediction is that of the spoken form, not of the digits.
    info, _ = _fetch_wav(s3, st.url)
    assert info.frames == _expected_frames(st.spoken_text)

    engine = Engine("random-tiny", device="cpu").load()
    prompt = engine._prompt_ids(SynthRequest(text=st.spoken_text))
    tokenizer = engine.tokenizer._tokenizer
    digit_ids = {tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    assert not digit_ids & set(prompt)
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        assert any(prompt[i:i + len(ids)] == ids for i in range(len(prompt))), w


def test_spoken_form_is_the_content_key(worker: WorkerProc, client: Client) -> None:
    """"$5" and "five dollars" are one output: the second is served from storage."""
    tag = _letters()
    [a] = client.wait([client.submit({"text": f"Pay $5 to {tag}.", "voice": 2})], timeout=120)
    [b] = client.wait([client.submit({"text": f"Pay five dollars to {tag}.", "voice": 2})], timeout=120)
    assert a.status == b.status == "SUCCESS" and a.url == b.url
    assert a.spoken_text == b.spoken_text == f"Pay five dollars to {tag}."
    assert client.app.backend.get_task_meta(b.id)["result"]["cached"] is True


def test_lang_normalize_fields_and_dropped_characters(worker: WorkerProc, client: Client) -> None:
    metrics = f"http://127.0.0.1:{worker.env['TTSPOOL_METRICS_PORT']}/metrics"

    def dropped() -> float:
        return value(parse(fetch(metrics)[1]), "ttspool_text_dropped_characters_total") or 0.0

    before = dropped()
    tag = _letters()
    ids = client.submit_many([
        {"text": f"第3名 {tag}", "lang": "en"},
        {"text": f"Room 12 {tag} ☃☃", "lang": "zh"},
        {"text": f"Pay $5 {tag}.", "normalize": False},
    ])
    forced_en, forced_zh, raw = client.wait(ids, timeout=120)
    assert forced_en.spoken_text == f"第 three 名 {tag}"
    assert forced_zh.spoken_text == f"Room 十二 {tag}"
    assert raw.spoken_text == f"Pay {tag}."
    # ☃☃ and "$5" had no reading: counted, and logged once per job with the characters.
    assert dropped() - before == 4
    # ... and named in the results.
    assert (forced_en.dropped, forced_zh.dropped, raw.dropped) == (None, "☃", "$5")
    assert f"job {ids[1]}: left out 2 character(s) with no reading: '\\u2603'" in worker.log_text()


def test_every_output_format_through_the_worker(client: Client, s3: S3Endpoint) -> None:
    """Each format is encoded by the worker from the same synthesis: same length as the
    WAV (within codec padding), the right rate and content type, a key per format."""
    from .test_audio import _SLACK_S, decode

    tag = _letters()
    base = {"text": f"Formats for {tag}.", "voice": 6, "seed": 1}
    ids = client.submit_many([{**base, "format": f} for f in AUDIO_FORMATS])
    results = dict(zip(AUDIO_FORMATS, client.wait(ids, timeout=180)))
    assert all(st.status == "SUCCESS" for st in results.values()), results
    assert len({st.url for st in results.values()}) == len(AUDIO_FORMATS)
    wav_s = results["wav"].duration_s
    for fmt, st in results.items():
        key = st.url.removeprefix(f"s3://{BUCKET}/")
        obj = s3.client().get_object(Bucket=BUCKET, Key=key)
        assert obj["ContentType"] == FORMATS[fmt].content_type, fmt
        audio, rate = decode(obj["Body"].read(), fmt)
        assert rate == st.sample_rate == (8000 if fmt.endswith("-8k") else 24000), fmt
        assert abs(st.duration_s - wav_s) < 1e-3, fmt
        assert abs(len(audio) / rate - wav_s) <= _SLACK_S.get(fmt, 1e-3), fmt
    # The same request again in one of them is served from storage.
    [again] = client.wait([client.submit({**base, "format": "mp3"})], timeout=120)
    assert again.url == results["mp3"].url
    assert client.app.backend.get_task_meta(again.id)["result"]["cached"] is True

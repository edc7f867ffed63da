"""Bulk pipelines: JSONL submission, presigned URLs, idempotent job ids, per-tenant rate limits."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
import soundfile as sf

from storage.local import LocalStorage
from storage.s3 import S3Storage
from tasks.errors import RateLimited
from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client
from tasks.ratelimit import Limit, parse_limits
from tasks.settings import QUEUE_BULK, Settings

from .conftest import BUCKET, S3Endpoint, WorkerProc, run_cli


@pytest.fixture()
def idle_url(redis_server: LocalRedis) -> Iterator[str]:
    """A broker database no worker reads, so what was enqueued stays countable."""
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()
    r.close()


def _queued(url: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.llen(QUEUE_BULK))


# -- submit-file --------------------------------------------------------------------

INVALID = {17: "{not json", 100: json.dumps({"text": ""}), 250: json.dumps({"text": "hi", "speed": 12}),
           333: json.dumps({"text": "hi", "volume": 3}), 499: json.dumps(["a list"])}


def _jobs_file(path: Path, n: int = 500) -> list[int]:
    lines, valid = [], []
    for i in range(1, n + 1):
        if i in INVALID:
            lines.append(INVALID[i])
        else:
            lines.append(json.dumps({"text": f"Bulk line number {i}.", "voice": i % 7, "max_tokens": 4}))
            valid.append(i)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return valid


def test_jsonl_500_lines_5_invalid_all_valid_ones_complete(worker: WorkerProc, s3: S3Endpoint, tmp_path: Path) -> None:
    jobs, results = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    valid = _jobs_file(jobs)
    out = run_cli(worker.env, "submit-file", str(jobs), "--wait", "--results", str(results), "--presign", "600", "--timeout", "280")
    assert out.returncode == 1, out.stderr[-3000:]  # some lines were invalid
    reported = [line for line in out.stderr.splitlines() if ": line " in line]
    assert [int(re.search(r": line (\d+)", line)[1]) for line in reported] == sorted(INVALID)  # type: ignore[index]
    assert "not JSON" in reported[0] and "text" in reported[1] and "speed" in reported[2] and "volume" in reported[3]
    assert "enqueued 495 job(s), 0 already submitted, 5 invalid line(s)" in out.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["line"] for r in rows] == valid and len(rows) == 495
    assert all(r["status"] == "SUCCESS" and r["duration_s"] > 0 and r["error"] is None for r in rows)
    assert len({r["id"] for r in rows}) == 495
    # What each line was spoken as: its number in words.
    assert rows[0]["line"] == 1 and rows[0]["spoken_text"] == "Bulk line number one."
    assert [r["spoken_text"] for r in rows if r["line"] == 123] == ["Bulk line number one hundred twenty three."]
    # Presigned: plain HTTPS(-style) GETs, no credentials needed by whoever downloads.
    assert all(r["url"].startswith(s3.url + f"/{BUCKET}/") and "Signature=" in r["url"] for r in rows)
    with urllib.request.urlopen(rows[0]["url"], timeout=10) as resp:
        info = sf.info(io.BytesIO(resp.read()))
    assert info.samplerate == 24000 and abs(info.frames / 24000 - rows[0]["duration_s"]) < 1e-4


def test_jsonl_strict_enqueues_nothing_and_lenient_enqueues_the_valid(worker: WorkerProc, idle_url: str, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    valid = _jobs_file(jobs, n=120)
    strict = run_cli(worker.env, "--broker-url", idle_url, "submit-file", str(jobs), "--strict")
    assert strict.returncode == 2 and "nothing enqueued" in strict.stderr and _queued(idle_url) == 0
    lenient = run_cli(worker.env, "--broker-url", idle_url, "submit-file", str(jobs), "--json")
    assert lenient.returncode == 1 and _queued(idle_url) == len(valid) == 118
    assert [json.loads(line)["line"] for line in lenient.stdout.splitlines()] == valid


# Each malformed line as written, and where an editor shows the fault: (line, column, why).
MALFORMED = [
    ('\ufeff{"text": "A file saved with a byte order mark."}', None),
    ('{"text": "a trailing comma",}', (2, 29, "not JSON (Expecting property name enclosed in double quotes)")),
    ('  {"text": "cut short"', (3, 23, "not JSON (Expecting ',' delimiter)")),
    ('{"text": "日本語の文", oops}', (4, 19, "not JSON (Expecting property name enclosed in double quotes)")),
    ('{"text": "fine"} {"text": "two on a line"}', (5, 18, "not JSON (Extra data)")),
    ('{"text": "a raw\ttab"}', (6, 16, "not JSON (Invalid control character at)")),
    ('{"text": "Windows line end"}\r', None),
    ("", None),
    ('{"text": "no line end at the end" "of the file"}', (9, 35, "not JSON (Expecting ',' delimiter)")),
]


def test_malformed_lines_are_reported_at_their_line_and_column(idle_url: str, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    text = "\n".join(line for line, _ in MALFORMED).encode()
    # A line that is not UTF-8 (Latin-1 bytes): reported at its first bad byte, the rest still read.
    jobs.write_bytes(text.replace(b'"Windows', b'"Caf\xe9 Windows'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env |= {"TTSPOOL_BROKER_URL": idle_url, "TTSPOOL_STORAGE_URL": tmp_path.as_uri()}
    proc = run_cli(env, "submit-file", str(jobs), "--strict")
    assert proc.returncode == 2 and _queued(idle_url) == 0
    expected = [f"ttspool: {jobs}: line {n}, column {c}: {why}" for _, where in MALFORMED if where for n, c, why in [where]]
    expected.insert(5, f"ttspool: {jobs}: line 7, column 14: not UTF-8 (byte 0xe9)")
    assert proc.stderr.splitlines()[:-1] == expected
    assert proc.stderr.splitlines()[-1] == "ttspool: 7 invalid line(s); --strict: nothing enqueued"


# -- presigned URLs -----------------------------------------------------------------


def test_presigned_urls(s3: S3Endpoint, tmp_path: Path) -> None:
    store = S3Storage(BUCKET, "presign", endpoint_url=s3.url)
    store.put_bytes("a/b.txt", b"hello presign")
    url = store.presigned_url("a/b.txt", 120)
    assert url.startswith(f"{s3.url}/{BUCKET}/presign/a/b.txt?") and "X-Amz-Expires=120" in url
    assert "FAKE-SECRET" not in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"hello presign"
    for bad in (0, 8 * 86400):
        with pytest.raises(ValueError, match="lifetime"):
            store.presigned_url("a/b.txt", bad)
    local = LocalStorage(tmp_path)
    local.put_bytes("x/y.wav", b"data")
    assert local.presigned_url("x/y.wav", 60) == (tmp_path / "x/y.wav").as_uri()


# -- idempotency --------------------------------------------------------------------


def test_submit_file_rerun_enqueues_nothing_twice(idle_url: str, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"text": f"Line {i}.", "job_id": f"rerun-{i}"}) + "\n" for i in range(3)))
    env = {**os.environ, "TTSPOOL_BROKER_URL": idle_url}
    first, second = (run_cli(env, "submit-file", str(jobs), "--json") for _ in range(2))
    assert "enqueued 3 job(s), 0 already submitted, 0 invalid line(s)" in first.stderr, first.stderr
    assert "enqueued 0 job(s), 3 already submitted, 0 invalid line(s)" in second.stderr, second.stderr
    assert [json.loads(line)["new"] for line in second.stdout.splitlines()] == [False] * 3
    assert _queued(idle_url) == 3


def test_same_job_id_twice_is_one_job_with_one_result(client: Client) -> None:
    job_id = "idem-" + uuid.uuid4().hex
    first = client.submit({"text": "Only once, please.", "job_id": job_id, "max_tokens": 6})
    done = client.wait([first], timeout=120)[0]
    assert done.status == "SUCCESS"
    meta = client.app.backend.get_task_meta(job_id)
    again = client.submit({"text": "Only once, please.", "job_id": job_id, "max_tokens": 6})
    assert again == job_id and client.status(again) == done
    time.sleep(1.0)  # a second synthesis, had one been enqueued, would have rewritten the result
    assert client.app.backend.get_task_meta(job_id) == meta


def test_concurrent_duplicate_submits_enqueue_one_message(idle_url: str) -> None:
    job_id = "idem-race-" + uuid.uuid4().hex
    settings = Settings(broker_url=idle_url)
    barrier = threading.Barrier(12)
    got: list[str] = []

    def submit() -> None:
        c = Client(settings)
        try:
            barrier.wait(10)
            got.append(c.submit({"text": "Race me.", "job_id": job_id}))
        finally:
            c.close()

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == [job_id] * 12 and _queued(idle_url) == 1
    c = Client(settings)
    try:  # the same id twice within one call is one job too; a new id is a new job
        ids = c.submit_many([{"text": "a", "job_id": "dup-1"}, {"text": "a", "job_id": "dup-1"}, {"text": "b"}])
    finally:
        c.close()
    assert ids[0] == ids[1] == "dup-1" and ids[2] != "dup-1" and _queued(idle_url) == 3


def test_cli_submit_same_job_id_returns_the_existing_result(worker: WorkerProc) -> None:
    job_id = "idem-cli-" + uuid.uuid4().hex
    runs = [run_cli(worker.env, "submit", "Asked for twice.", "--job-id", job_id, "--max-tokens", "6", "--wait", "--json")
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    first, second = (json.loads(r.stdout) for r in runs)
    assert first == second and first["status"] == "SUCCESS" and first["id"] == job_id


# -- rate limits --------------------------------------------------------------------


def test_rate_limit_config_parsing() -> None:
    limits = parse_limits("acme=10/s:burst=20, beta=600/m,*=5/h")
    assert limits["acme"] == Limit(10.0, 20) and limits["beta"] == Limit(10.0, 600)
    assert limits["*"].burst == 5 and abs(limits["*"].rate - 5 / 3600) < 1e-12
    assert parse_limits("") == {}
    for bad in ("acme", "acme=10", "acme=10/d", "acme=0/s", "acme=1/s:burst=0", "bad tenant=1/s"):
        with pytest.raises(ValueError, match="TTSPOOL_RATE_LIMITS"):
            parse_limits(bad)


def test_concurrent_submitters_never_exceed_the_bucket(idle_url: str) -> None:
    # Almost no refill during the test: exactly `burst` jobs may get through.
    limits = {"acme": Limit(rate=0.001, burst=20)}
    settings = Settings(broker_url=idle_url)
    barrier = threading.Barrier(8)
    accepted: list[str] = []
    refused: list[RateLimited] = []

    def submitter(n: int) -> None:
        c = Client(settings, rate_limits=limits)
        try:
            barrier.wait(10)
            for i in range(10):
                try:
                    accepted.append(c.submit({"text": f"job {n}-{i}", "tenant": "acme"}))
                except RateLimited as err:
                    refused.append(err)
        finally:
            c.close()

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(accepted) == 20 and len(refused) == 60 and _queued(idle_url) == 20
    assert all(e.tenant == "acme" and "over its rate limit" in str(e) for e in refused)


def test_rate_limit_is_all_or_nothing_per_submit_and_refills(idle_url: str) -> None:
    c = Client(Settings(broker_url=idle_url), rate_limits=parse_limits("acme=20/s:burst=4,*=1/h"))
    try:
        c.submit_many([{"text": "x", "tenant": "acme"}] * 3)
        with pytest.raises(RateLimited, match="2 job\\(s\\) asked, 1 available") as err:
            c.submit_many([{"text": "x", "tenant": "acme"}, {"text": "y", "tenant": "acme"}])
        assert _queued(idle_url) == 3
        with pytest.raises(RateLimited, match="never allows more than 4"):
            c.submit_many([{"text": "x", "tenant": "acme"}] * 5)
        # Two tenants in one call: the short one stops both.
        c.submit({"text": "first of other", "tenant": "other"})  # `*` gives every other tenant 1/h
        with pytest.raises(RateLimited, match="'other'"):
            c.submit_many([{"text": "x", "tenant": "acme"}, {"text": "y", "tenant": "other"}])
        assert _queued(idle_url) == 4
        c.submit_many([{"text": "no tenant, no limit"}] * 10)
        assert _queued(idle_url) == 14
        time.sleep(err.value.retry_after_s + 0.1)  # refilled at 20/s
        c.submit_many([{"text": "x", "tenant": "acme"}] * 2)
        assert _queued(idle_url) == 16
    finally:
        c.close()


def test_cli_over_the_limit_is_a_clear_error(worker: WorkerProc, idle_url: str, tmp_path: Path) -> None:
    env = {**worker.env, "TTSPOOL_RATE_LIMITS": "cli-tenant=2/h"}
    jobs = tmp_path / "one.jsonl"
    jobs.write_text(json.dumps({"text": "one", "tenant": "cli-tenant"}) + "\n")
    first = run_cli(env, "--broker-url", idle_url, "submit-file", str(jobs))
    assert first.returncode == 0 and _queued(idle_url) == 1
    book = tmp_path / "book.txt"
    book.write_text("First sentence here. Second one there.")
    refused = run_cli(env, "--broker-url", idle_url, "book", str(book), "--tenant", "cli-tenant", "--max-segment-s", "2", "--no-wait")
    assert refused.returncode == 1 and _queued(idle_url) == 1
    assert refused.stderr.startswith("ttspool: error: tenant 'cli-tenant' is over its rate limit (2/h, burst 2): "
                                     "2 job(s) asked, 1 available; nothing enqueued")
    assert refused.stderr.count("\n") == 1
    with redis.Redis.from_url(idle_url) as r:
        assert r.keys("ttspool:book:*") == []  # the refused book left nothing behind


def test_presign_on_a_local_folder_says_it_does_nothing(worker: WorkerProc, idle_url: str, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"text": "Kept in a folder."}) + "\n")
    env = {**worker.env, "TTSPOOL_STORAGE_URL": (tmp_path / "out").as_uri()}
    out = run_cli(env, "--broker-url", idle_url, "submit-file", str(jobs), "--presign", "60")
    assert out.returncode == 0, out.stderr
    assert "--presign applies to S3 storage" in out.stderr and "printed as they are" in out.stderr

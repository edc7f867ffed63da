"""Books end to end: segments -> real worker (random-tiny) -> assembly -> audio, manifest, SRT in S3."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tasks.book import BOOK_TTL, book_key, book_status, segment_job_id, submit_book, wait_book
from tasks.producer import Client
from tasks.schema import JobValidationError
from tasks.settings import ASSEMBLE_TASK, QUEUE_ASSEMBLE
from tasks.text.segments import split_text

from .conftest import BUCKET, S3Endpoint, WorkerProc, run_cli

SR = 24000
MIXED = ("第一章 天亮了。他走出家门，看见了太阳！“你好吗？”她问道。Then he said: \"Fine, thanks.\" "
         "The price was 3.14 dollars; nobody cared. 最后，他们一起去了市场……\n\n"
         "A new paragraph starts here! Does it work? 当然可以。Short one. 又一句话；再来一句。")
FINAL_KEYS = {"id", "status", "url", "manifest_url", "srt_url", "duration_s", "segments", "error"}


def _get(s3: S3Endpoint, url: str) -> bytes:
    assert url.startswith(f"s3://{BUCKET}/"), url
    return s3.client().get_object(Bucket=BUCKET, Key=url.removeprefix(f"s3://{BUCKET}/"))["Body"].read()


def _srt(text: str) -> list[tuple[float, float, str]]:
    def secs(t: str) -> float:
        h, m, rest = t.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    out = []
    for n, block in enumerate(text.strip().split("\n\n"), 1):
        num, times, body = block.split("\n", 2)
        assert int(num) == n
        a, b = re.fullmatch(r"(\S+) --> (\S+)", times).groups()
        out.append((secs(a), secs(b), body))
    return out


def _check_book(s3: S3Endpoint, client: Client, final: dict, pause_ms: int, texts: list[str]) -> np.ndarray:
    """Audio = segments in order with pauses; manifest and SRT agree with it. Returns the audio."""
    assert final["status"] == "SUCCESS" and final["error"] is None, final
    audio, sr = sf.read(io.BytesIO(_get(s3, final["url"])), dtype="int16")
    assert sr == SR and abs(len(audio) / SR - final["duration_s"]) < 0.01
    manifest = json.loads(_get(s3, final["manifest_url"]))
    segs = manifest["segments"]
    assert [s["text"] for s in segs] == texts and [s["index"] for s in segs] == list(range(len(texts)))
    assert manifest["duration_s"] == final["duration_s"] and final["segments"] == len(texts)
    # Each segment records what the model was given for it.
    assert all(s["spoken_text"] and not any(c.isdigit() for c in s["spoken_text"]) for s in segs)
    pause = pause_ms / 1000
    job_durations = [client.status(s["job_id"]).duration_s for s in segs]
    assert abs(sum(job_durations) + pause * (len(segs) - 1) - final["duration_s"]) < 0.01
    assert segs[0]["start_s"] == 0 and abs(segs[-1]["end_s"] - final["duration_s"]) < 0.001
    for s, d, nxt in zip(segs, job_durations, segs[1:] + [None]):
        assert abs(s["end_s"] - s["start_s"] - d) < 0.001
        if nxt is not None:
            assert abs(nxt["start_s"] - s["end_s"] - pause) < 0.001
        # The samples at the manifest's place are exactly the segment's own audio.
        own, _ = sf.read(io.BytesIO(_get(s3, s["url"])), dtype="int16")
        a = round(s["start_s"] * SR)
        assert np.array_equal(audio[a:a + len(own)], own)
        if nxt is not None and pause_ms:
            assert not audio[a + len(own):round(nxt["start_s"] * SR)].any()
    subs = _srt(_get(s3, final["srt_url"]).decode())
    assert [t for _, _, t in subs] == texts
    for (a, b, _), s in zip(subs, segs):
        assert abs(a - s["start_s"]) <= 0.0006 and abs(b - s["end_s"]) <= 0.0006
    return audio


def test_mixed_punctuation_book_assembles_in_order_with_pauses(client: Client, s3: S3Endpoint) -> None:
    book_id = submit_book(client, MIXED, voice=11, seed=5, pause_ms=250, max_segment_s=4)
    st = wait_book(client.redis, book_id, timeout=300)
    texts = [s.text for s in split_text(MIXED, max_steps=round(4 * 46.875))]
    assert len(texts) >= 5
    _check_book(s3, client, st.to_dict(), 250, texts)
    assert st.done == st.segments == len(texts) and st.failed == 0
    for i in range(len(texts)):  # every segment ran with the book's voice and seed
        meta = client.app.backend.get_task_meta(segment_job_id(book_id, i, 1))
        assert meta["status"] == "SUCCESS"


def test_20k_character_chapter_end_to_end_via_cli(worker: WorkerProc, client: Client, s3: S3Endpoint, tmp_path: Path) -> None:
    sentence = ("这是一个用于测试的中文句子，里面有逗号。This English sentence follows it, "
                "with a comma and a full stop. 然后还有一句！Is it done? ")
    text = (sentence * (20_000 // len(sentence) + 1))[:20_000]
    path = tmp_path / "chapter.txt"
    path.write_text(text, encoding="utf-8")
    # Short segments of 8 GPT steps each keep random-tiny on the CPU quick.
    out = run_cli(worker.env, "book", str(path), "--voice", "3", "--seed", "7", "--pause-ms", "300",
               "--out-format", "opus", "--max-tokens", "8", "--json", "--timeout", "280")
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout)
    assert set(final) == FINAL_KEYS
    assert final["url"].endswith(".opus") and final["manifest_url"].endswith(".json") and final["srt_url"].endswith(".srt")
    texts = [s.text for s in split_text(text)]
    assert final["segments"] == len(texts) >= 50
    manifest = json.loads(_get(s3, final["manifest_url"]))
    assert "".join(s["text"] for s in manifest["segments"]).replace(" ", "") == " ".join(text.split()).replace(" ", "")
    info = sf.info(io.BytesIO(_get(s3, final["url"])))
    assert info.format == "OGG" and info.samplerate == SR
    segment_s = 512 * 8 - 256
    expected = (len(texts) * segment_s + (len(texts) - 1) * round(0.3 * SR)) / SR
    assert abs(final["duration_s"] - expected) < 0.01 and abs(info.frames / SR - expected) < 0.01


def test_cli_no_wait_status_and_flac(worker: WorkerProc, client: Client, s3: S3Endpoint, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("One sentence. Two sentences! 三句话。Four?", encoding="utf-8")
    out = run_cli(worker.env, "book", str(path), "--out-format", "flac", "--pause-ms", "0", "--max-segment-s", "2", "--no-wait")
    assert out.returncode == 0, out.stderr
    book_id = out.stdout.strip()
    deadline = time.monotonic() + 120
    while True:
        st = json.loads(run_cli(worker.env, "status", book_id, "--json").stdout)
        assert set(st) == FINAL_KEYS | {"done", "failed", "audio_s"} and st["id"] == book_id
        if st["status"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st["done"] == st["segments"] == 3
    audio = _check_book(s3, client, st, 0, ["One sentence.", "Two sentences!", "三句话。Four?"])
    assert sf.info(io.BytesIO(_get(s3, st["url"]))).format == "FLAC" and len(audio) > 0
    plain = run_cli(worker.env, "status", book_id)
    assert plain.returncode == 0 and "SUCCESS 3/3 segments" in plain.stdout


def test_failing_segment_is_retried_then_the_book_fails_naming_it(client: Client) -> None:
    # Cyrillic normalizes to nothing in ChatTTS: that segment fails on every attempt.
    book_id = submit_book(client, "", segments=["Fine here.", "Привет мир", "Also fine."], max_segment_s=5)
    st = wait_book(client.redis, book_id, timeout=120)
    assert st.status == "FAILURE" and st.url is None
    assert "segment(s) 1 failed after 3 attempts" in st.error and "empty" in st.error
    attempts = [client.status(segment_job_id(book_id, 1, a)).status for a in (1, 2, 3)]
    assert attempts == ["FAILURE"] * 3
    assert client.status(segment_job_id(book_id, 1, 4)).status == "PENDING"  # bounded: no 4th try
    assert st.done == 2 and st.failed == 1
    assert book_status(client.redis, "book-" + "0" * 32) is None


def test_bad_book_input_enqueues_nothing(client: Client) -> None:
    before = client.redis.keys("ttspool:book:*")
    for kwargs, msg in [({"out_format": "mp3"}, "format"), ({"pause_ms": -1}, "pause"),
                        ({"job": {"text": "x"}}, "cannot set"), ({"segments": ["ok", "x" * 2001]}, "segment 1")]:
        with pytest.raises(JobValidationError, match=msg):
            submit_book(client, "Some text.", **kwargs)
    with pytest.raises(JobValidationError, match="empty"):
        submit_book(client, "  \n ")
    assert client.redis.keys("ttspool:book:*") == before


def test_assembling_a_book_whose_keys_are_gone_leaves_nothing_behind_forever(client: Client) -> None:
    # A book that expired (or was deleted) before its assembly ran: the failure is
    # recorded, but its hash must expire like every other book key.
    book_id = "book-" + "0" * 31 + "1"
    r = client.redis
    r.delete(book_key(book_id))
    client.app.send_task(ASSEMBLE_TASK, kwargs={"book_id": book_id}, task_id=f"{book_id}.assemble",
                         queue=QUEUE_ASSEMBLE)
    deadline = time.monotonic() + 60
    while not r.exists(book_key(book_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.hget(book_key(book_id), "state") == b"FAILURE"
    assert 0 < r.ttl(book_key(book_id)) <= BOOK_TTL

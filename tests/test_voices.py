"""The voice library against a real Redis, a real S3 endpoint and real workers: named
voices, versions changed live, recordings as voices, mixes, and the checks on the way in."""

from __future__ import annotations

import io
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pybase16384 as b14
import pytest
import redis
import soundfile as sf
import torch
import torch.nn.functional as F

from storage import storage_for
from tasks.book import submit_book, wait_book
from tasks.producer import Client
from tasks.schema import JobValidationError, parse_job
from tasks.settings import QUEUE_BULK, TASK_NAME
from tasks.voices import INDEX_KEY, OPENAI_VOICES, VoiceError, VoiceLibrary, VoiceNotFound

from .conftest import BUCKET, S3Endpoint, WorkerProc, run_cli, running_worker, worker_env


def _tone(seconds: float, rate: int = 24_000, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(1).standard_normal(len(t))
    data = np.stack([wav * (0.5 + c / 2) for c in range(channels)], axis=1)
    out = io.BytesIO()
    sf.write(out, data.astype(np.float32), rate, format=fmt)
    return out.getvalue()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def library(worker: WorkerProc) -> Iterator[VoiceLibrary]:
    index = redis.Redis.from_url(worker.settings.broker_url)
    yield VoiceLibrary(storage_for(worker.settings), index)
    index.close()


def _pcm(s3: S3Endpoint, url: str) -> np.ndarray:
    data = s3.client().get_object(Bucket=BUCKET, Key=url.removeprefix(f"s3://{BUCKET}/"))["Body"].read()
    return sf.read(io.BytesIO(data), dtype="int16")[0]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """The same audio: rows decoded in one batched call may differ in the last bit."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def _run(client: Client, *jobs: dict) -> list:
    ids = client.submit_many(list(jobs))
    return client.wait(ids, timeout=300)


# -- the library on its own --------------------------------------------------------


def test_versions_index_and_builtins(library: VoiceLibrary, worker: WorkerProc) -> None:
    name = _name("lib")
    first = library.add(name, seed=42, description="calm narrator")
    assert (first.version, first.kind, first.embedding.seed) == (1, "seed", 42)
    with pytest.raises(VoiceError, match="exists"):
        library.add(name, seed=43)
    second = library.add(name, seed=43, replace=True)
    assert second.version == 2 and second.digest != first.digest
    # The record is durable in the store: a flushed Redis loses nothing, and the index
    # refills from the store on the next read.
    assert library.index is not None
    library.index.delete(INDEX_KEY)
    bare = VoiceLibrary(None, library.index)  # a producer without storage credentials
    assert bare.get(name) is None
    assert library.get(name).version == 2 and bare.get(name).version == 2
    stored = json.loads(storage_for(worker.settings).get_bytes(f"voices/{name}.json"))
    assert stored["version"] == 2 and stored["embedding"] == {"seed": 43, "speaker": None, "mix": None}
    # OpenAI's names are built-in entries; one can be replaced, and removing that brings it back.
    # The index refilled from the store says it is complete: a name it lacks (a built-in
    # nobody replaced) is answered without asking the store.
    assert library.get("nova").builtin and library.index.hexists(INDEX_KEY, ".")
    assert library.index.hget(INDEX_KEY, "nova") is None
    names = {v.name: v for v in library.list()}
    assert set(OPENAI_VOICES) <= set(names) and names[name].version == 2
    assert names["alloy"].builtin and names["alloy"].embedding.seed == OPENAI_VOICES["alloy"]
    with pytest.raises(VoiceError, match="built-in"):
        library.remove("alloy")
    with pytest.raises(VoiceError, match="exists"):
        library.add("shimmer", seed=5)
    try:
        assert library.add("shimmer", seed=5, replace=True).version == 1
        assert library.get("shimmer").embedding.seed == 5
    finally:
        library.remove("shimmer")
    assert library.get("shimmer").builtin
    library.remove(name)
    assert library.get(name) is None and bare.get(name) is None
    with pytest.raises(VoiceNotFound):
        library.remove(name)


@pytest.mark.parametrize("name", ["", "-x", "a b", "../etc", "x" * 129, "1234", "é"])
def test_names_follow_the_job_id_charset(library: VoiceLibrary, name: str) -> None:
    with pytest.raises(VoiceError, match="voice name"):
        library.add(name, seed=1)


def test_recordings_are_checked_and_stored_as_24k_mono(library: VoiceLibrary, worker: WorkerProc) -> None:
    name = _name("rec")
    voice = library.add(name, recording=_tone(3.0, rate=44_100, channels=2, fmt="FLAC"),
                        transcript="  Hello,   this is my voice. ")
    assert voice.kind == "recording" and voice.recording is not None
    assert voice.recording.transcript == "Hello, this is my voice." and abs(voice.recording.duration_s - 3.0) < 0.01
    pcm, rate = sf.read(io.BytesIO(library.recording_audio(voice)), dtype="int16")
    assert rate == 24_000 and pcm.ndim == 1 and abs(len(pcm) - 72_000) <= 2
    for data, transcript, reason in [
        (_tone(0.5), "hi", "0.5 s long"),
        (_tone(16.0, rate=8_000), "hi", "16.0 s long"),
        (_tone(2.0)[:44] + bytes(96_000), "hi", "silent"),
        (b"not audio at all" * 100, "hi", "not a readable audio file"),
        (_tone(2.0), "   ", "needs its transcript"),
        (_tone(2.0), "x" * 301, "transcript is longer"),
    ]:
        with pytest.raises(VoiceError, match=reason):
            library.add(_name("bad"), recording=data, transcript=transcript)
    with pytest.raises(VoiceError, match="recording.*can be mixed"):
        library.add(_name("mix"), mix=f"alloy:0.5,{name}:0.5")
    for spec, reason in [("alloy:0.5", "2-8 voices"), ("alloy:x,echo:1", "not a number"),
                         ("alloy:0,echo:1", "above 0"), ("alloy:1,nobody-here:1", "unknown voice")]:
        with pytest.raises(VoiceError, match=reason):
            library.add(_name("mix"), mix=spec)
    library.remove(name)
    assert not storage_for(worker.settings).list_keys(f"voices/{name}/")


def test_job_voice_field_takes_names_seeds_and_speaker_strings() -> None:
    assert parse_job({"text": "hi", "voice": "narrator"}).voice_name == "narrator"
    assert parse_job({"text": "hi", "voice": 7}).voice_name is None
    with pytest.raises(JobValidationError, match="integers"):
        parse_job({"text": "hi", "voice": "12"})
    with pytest.raises(JobValidationError, match="speaker string"):
        parse_job({"text": "hi", "voice": "not a name!"})


# -- with a real worker ----------------------------------------------------------------


def test_named_voice_is_its_seed_and_a_replacement_is_used_live(worker: WorkerProc, client: Client,
                                                                 s3: S3Endpoint) -> None:
    name = _name("narrator")
    added = run_cli(worker.env, "voice", "add", name, "--seed", "42", "--description", "the narrator", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["version"] == 1
    text = {"text": f"A line for the narrator, read twice ({uuid.uuid4().hex[:6]})."}
    # One job per batch: with tiny random weights a voice moves the audio by about one
    # step of PCM16, as little as decoding rows together can, so rows are compared alone.
    named, seeded = _run(client, {**text, "voice": name})[0], _run(client, {**text, "voice": 42})[0]
    assert named.status == seeded.status == "SUCCESS"
    assert np.array_equal(_pcm(s3, named.url), _pcm(s3, seeded.url))
    replaced = run_cli(worker.env, "voice", "add", name, "--seed", "43", "--replace")
    assert replaced.returncode == 0 and "v2" in replaced.stdout, replaced.stderr
    time.sleep(worker.settings.voice_cache_s + 0.5)  # the worker reads a voice again after this
    again, other = _run(client, {**text, "voice": name})[0], _run(client, {**text, "voice": 43})[0]
    # The same job now synthesizes the new version (no audio of the old one from the cache).
    assert again.url != named.url and np.array_equal(_pcm(s3, again.url), _pcm(s3, other.url))
    assert not np.array_equal(_pcm(s3, again.url), _pcm(s3, named.url))
    assert client.app.backend.get_task_meta(again.id)["result"]["voice"] == {"name": name, "version": 2,
                                                                            "space": "shared"}
    shown = run_cli(worker.env, "voice", "show", name, "--json")
    assert json.loads(shown.stdout)["seed"] == 43
    assert run_cli(worker.env, "voice", "rm", name).returncode == 0


def test_unknown_name_is_refused_by_the_producer(worker: WorkerProc, client: Client) -> None:
    job_id = _name("nobody")
    before = client.redis.llen(QUEUE_BULK)
    with pytest.raises(JobValidationError, match="unknown voice 'no-such-voice'"):
        client.submit_many([{"text": "fine", "job_id": job_id}, {"text": "hi", "voice": "no-such-voice"}])
    assert client.redis.llen(QUEUE_BULK) == before and client.status(job_id).status == "PENDING"
    cli = run_cli(worker.env, "submit", "hello", "--voice", "no-such-voice")
    assert cli.returncode == 2 and "unknown voice 'no-such-voice'" in cli.stderr


def test_submit_file_takes_names_and_refuses_unknown_ones_line_by_line(worker: WorkerProc, library: VoiceLibrary,
                                                                        tmp_path: Path) -> None:
    name = _name("bulk")
    library.add(name, seed=5)
    lines = [{"text": "First line.", "voice": name}, {"text": "Second line.", "voice": "no-such-voice"},
             {"text": "Third line.", "voice": "alloy"}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    strict = run_cli(worker.env, "submit-file", str(jobs), "--strict")
    assert strict.returncode == 2 and "line 2: invalid job: voice: unknown voice 'no-such-voice'" in strict.stderr
    done = run_cli(worker.env, "submit-file", str(jobs), "--wait", "--json")
    rows = [json.loads(r) for r in done.stdout.splitlines()]
    assert done.returncode == 1 and [(r["line"], r["status"]) for r in rows] == [(1, "SUCCESS"), (3, "SUCCESS")]
    assert "enqueued 2 job(s), 0 already submitted, 1 invalid line(s)" in done.stderr
    library.remove(name)


def test_voice_removed_after_sending_fails_the_job_at_the_worker(worker: WorkerProc, client: Client,
                                                                  library: VoiceLibrary) -> None:
    name = _name("gone")
    library.add(name, seed=3)
    library.remove(name)
    # A plain Celery client checks nothing: the worker is the one that refuses it.
    job_id = _name("job")
    client.app.send_task(TASK_NAME, kwargs={"text": "hello", "voice": name}, task_id=job_id, queue=QUEUE_BULK)
    status = client.wait([job_id], timeout=120)[0]
    assert status.status == "FAILURE" and f"voice {name!r} is not in the voice library" in status.error


def test_recording_voice_in_a_batch_with_seed_voices(worker: WorkerProc, client: Client, library: VoiceLibrary,
                                                     s3: S3Endpoint) -> None:
    name = _name("ref")
    library.add(name, recording=_tone(3.0), transcript="Hello there, this is my voice.")
    job = {"text": "Good morning, everyone.", "voice": name, "seed": 9}
    # Alone first (FLAC: another content key, the same samples), then among seed voices.
    alone = _run(client, {**job, "format": "flac"})[0]
    batch = _run(client, *({"text": f"Seed voice row {i}.", "voice": i + 1} for i in range(5)), job)
    assert alone.status == "SUCCESS" and all(s.status == "SUCCESS" for s in batch), (alone, batch)
    assert _same(_pcm(s3, batch[-1].url), _pcm(s3, alone.url))
    seeded = _run(client, {**job, "voice": 9, "format": "flac"})[0]
    assert not np.array_equal(_pcm(s3, seeded.url), _pcm(s3, alone.url))
    assert f"voice {name} v1: 141 reference codes" in worker.log_text()
    library.remove(name)


def test_mix_voice_and_export(worker: WorkerProc, client: Client, library: VoiceLibrary) -> None:
    name = _name("blend")
    mix = run_cli(worker.env, "voice", "add", name, "--mix", "alloy:0.7,echo:0.3", "--json")
    assert mix.returncode == 0, mix.stderr
    assert json.loads(mix.stdout)["mix"] == [{"source": "alloy@0", "weight": 0.7}, {"source": "echo@0", "weight": 0.3}]
    exported = run_cli(worker.env, "voice", "export", name)
    assert exported.returncode == 0, exported.stderr
    speaker = exported.stdout.strip()
    seed_string = run_cli(worker.env, "voice", "export", "alloy").stdout.strip()
    # Checked against upstream's own draw: torch.manual_seed(s); sample_random_speaker()
    # with this model's speaker statistics, and the blend of the two unit vectors.
    from ChatTTS.model.speaker import Speaker

    from workers.engine.assets import ModelFetch, resolve
    from workers.engine.random_models import build_config

    overrides = resolve("random-tiny", fetch=ModelFetch.from_settings(worker.settings)).overrides
    stat = torch.from_numpy(np.frombuffer(b14.decode_from_string(build_config(overrides).spk_stat), np.float16).copy())
    std, mean = stat.chunk(2)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.randn(std.numel(), dtype=std.dtype) * std + mean

    assert torch.equal(torch.from_numpy(Speaker._decode(seed_string).copy()), draw(OPENAI_VOICES["alloy"]))
    unit = [F.normalize(draw(OPENAI_VOICES[v]).float(), dim=0) for v in ("alloy", "echo")]
    want = F.normalize(0.7 * unit[0] + 0.3 * unit[1], dim=0)
    got = torch.from_numpy(Speaker._decode(speaker).copy()).float()
    assert torch.allclose(got, want, atol=2e-3)  # float16 in the string
    # The string and the name are usable voices for jobs alike.
    by_name, by_string = _run(client, {"text": "Mixed voices speak.", "voice": name},
                              {"text": "Mixed voices speak.", "voice": speaker})
    assert by_name.status == by_string.status == "SUCCESS"
    library.remove(name)


def test_book_records_its_voice_version(worker: WorkerProc, client: Client, library: VoiceLibrary,
                                        s3: S3Endpoint) -> None:
    name = _name("book")
    library.add(name, seed=11)
    library.add(name, seed=12, replace=True)
    book_id = submit_book(client, "First sentence of the book. " * 3 + "\n\nSecond part of it. " * 3,
                          voice=name, max_segment_s=4.0)
    final = wait_book(client.redis, book_id, timeout=300)
    assert final.status == "SUCCESS", final
    manifest = json.loads(s3.client().get_object(Bucket=BUCKET, Key=final.manifest_url.removeprefix(
        f"s3://{BUCKET}/"))["Body"].read())
    assert manifest["voice"] == {"name": name, "version": 2, "versions_used": [2]}
    assert {s["voice_version"] for s in manifest["segments"]} == {2} and len(manifest["segments"]) > 1
    library.remove(name)


def test_two_workers_share_the_library(worker: WorkerProc, client: Client, library: VoiceLibrary,
                                       redis_server, s3: S3Endpoint, aws_env: dict[str, str],
                                       tmp_path: Path) -> None:
    name = _name("shared")
    library.add(name, recording=_tone(2.0), transcript="Two workers, one voice.")
    log = tmp_path / "second.log"
    env = worker_env(redis_server.url, s3, aws_env)
    with running_worker(env, log) as (proc, second):
        # Ready means its model is loaded (the warm-up job may have gone to the other one).
        health = f"http://127.0.0.1:{env['TTSPOOL_METRICS_PORT']}/healthz"
        for _ in range(600):
            try:
                with urllib.request.urlopen(health, timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, log.read_text(errors="replace")
                time.sleep(0.5)
        before = worker.log_text().count(f"voice {name} v1")
        ids = second.submit_many([{"text": f"Line {i} for both workers.", "voice": name, "seed": i}
                                  for i in range(40)])
        assert all(s.status == "SUCCESS" for s in second.wait(ids, timeout=300))
        # Each worker read the voice from the store itself and encoded its recording.
        assert f"voice {name} v1" in log.read_text(errors="replace")
        assert worker.log_text().count(f"voice {name} v1") > before
    library.remove(name)


"""The HTTP gateway (`ttspool serve`) against a real Redis, a real S3 endpoint and a real
worker, through clients nobody here wrote: the official OpenAI SDK and curl."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
import openai
import pytest
import soundfile as sf
from fastapi import FastAPI
from fastapi.testclient import TestClient

from storage import storage_for
from tasks.cli.local_redis import LocalRedis, free_port
from tasks.gateway import routes_jobs
from tasks.gateway.deps import GatewayState, gateway_state, tenant_of
from tasks.gateway.speech import chattts_speed
from tasks.producer import Client
from tasks.settings import Settings
from tasks.voices import OPENAI_VOICES

from .conftest import ROOT, S3Endpoint, WorkerProc, running_worker, stop_process, worker_env
from .test_audio import _SLACK_S, decode

KEY_A = "acme-key-0123456789abcdef"
KEY_B = "beta-key-0123456789abcdef"
KEY_SLOW = "slow-key-0123456789abcdef"
FORMATS = ("wav", "mp3", "opus", "aac", "flac", "pcm")
LONG = " ".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the band plays on, and everyone in "
    "the square stops to listen to the music drifting over the rooftops of the old town." for i in range(1, 6)
)


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def sdk(self, key: str = KEY_A) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: object = None, key: str | None = KEY_A,
                raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()


def start_gateway(env: dict[str, str], log: Path, **extra: str) -> Gateway:
    port = free_port()
    env = {**env, "TTSPOOL_HTTP_PORT": str(port), **extra}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "serve"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    gw = Gateway(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(gw.url + "/healthz", timeout=2):
                return gw
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    stop_process(proc)
    pytest.fail("gateway did not start")


@pytest.fixture(scope="module")
def gateway(worker: WorkerProc, tmp_path_factory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    gw = start_gateway(worker.env, log, TTSPOOL_API_KEYS=f"acme={KEY_A},beta={KEY_B},slow={KEY_SLOW}",
                       TTSPOOL_RATE_LIMITS="slow=1/m:burst=1", TTSPOOL_HTTP_MAX_BODY="65536")
    yield gw
    stop_process(gw.proc)


def _wav_seconds(data: bytes) -> float:
    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate


def test_openai_sdk_every_response_format(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    text = "The OpenAI client asks, the pool answers."
    out: dict[str, tuple[bytes, str]] = {}
    for fmt in FORMATS:
        resp = sdk.audio.speech.create(model="tts-1", voice="nova", input=text, response_format=fmt)  # type: ignore[arg-type]
        out[fmt] = (resp.content, resp.response.headers["content-type"])
    wav_s = _wav_seconds(out["wav"][0])
    assert wav_s > 0.5
    types = {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
             "flac": "audio/flac", "pcm": "audio/pcm"}
    for fmt, (data, content_type) in out.items():
        assert content_type == types[fmt], fmt
        audio, rate = decode(data, fmt)
        assert rate == 24000, fmt
        assert abs(len(audio) / rate - wav_s) <= _SLACK_S.get(fmt, 1e-3), fmt


def test_long_input_is_split_and_assembled(gateway: Gateway) -> None:
    resp = gateway.sdk().audio.speech.create(model="chattts", voice="alloy", input=LONG, response_format="wav")
    ids = resp.response.headers["x-job-ids"].split(",")
    assert len(ids) >= 2  # split like a book
    total = 0.0
    for job_id in ids:
        status, _, body = gateway.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200
        total += json.loads(body)["duration_s"]
    assert abs(_wav_seconds(resp.content) - total) < 1e-3


def test_streaming_sends_segments_in_order(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    chunks: list[bytes] = []
    with sdk.audio.speech.with_streaming_response.create(
        model="tts-1", voice="echo", input=LONG, response_format="wav", extra_body={"stream": True},
    ) as resp:
        ids = resp.headers["x-job-ids"].split(",")
        for chunk in resp.iter_bytes():
            chunks.append(chunk)
    data = b"".join(chunks)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    pcm = data[44:]
    # Every segment's audio, in order, nothing else: the same samples as each stored job's.
    expected = b""
    for job_id in ids:
        status, _, body = gateway.request("GET", f"/v1/jobs/{job_id}/audio")
        assert status == 200
        expected += body
    assert pcm == expected and len(ids) >= 2
    # A player reads the streamed header as "until the end".
    with wave.open(io.BytesIO(data[:44] + pcm)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (24000, 2, 1)
    # MP3 streams as whole segment files, one after another.
    with sdk.audio.speech.with_streaming_response.create(
        model="tts-1", voice="echo", input=LONG, response_format="mp3", extra_body={"stream": True},
    ) as resp:
        mp3 = resp.read()
    # Decoded by FFmpeg (what browsers and players use); libsndfile's reader takes an
    # MP3's length from its first frames and stops early on joined streams.
    with av.open(io.BytesIO(mp3), format="mp3") as src:
        samples = sum(frame.samples for frame in src.decode(audio=0))
    assert abs(samples / 24000 - len(pcm) / 48000) < 0.1 * len(ids)


def test_keys_tenants_and_rate_limits(gateway: Gateway, client: Client) -> None:
    with pytest.raises(openai.AuthenticationError):
        gateway.sdk("wrong-key-0123456789abcdef").audio.speech.create(model="tts-1", voice="alloy", input="hi")
    status, _, _ = gateway.request("POST", "/v1/jobs", {"text": "hello"}, key=None)
    assert status == 401
    slow = gateway.sdk(KEY_SLOW)
    slow.audio.speech.create(model="tts-1", voice="alloy", input="First one is free.")
    with pytest.raises(openai.RateLimitError) as err:
        slow.audio.speech.create(model="tts-1", voice="alloy", input="Second one waits.")
    assert int(err.value.response.headers["retry-after"]) >= 1
    # Jobs belong to the tenant whose key submitted them.
    status, _, body = gateway.request("POST", "/v1/jobs", [{"text": "Mine."}, {"text": "Mine too."}])
    assert status == 202
    ids = json.loads(body)["ids"]
    assert len(ids) == 2
    assert gateway.request("GET", f"/v1/jobs/{ids[0]}", key=KEY_B)[0] == 404
    assert gateway.request("POST", "/v1/jobs", {"text": "x", "tenant": "beta"})[0] == 403
    # Ids are per tenant: beta's order-7 is not acme's, and beta learns nothing of acme's
    # ids (the same 202 as for a fresh id); within acme's space an id stays one job's.
    for key, text in ((KEY_A, "Acme's order."), (KEY_B, "Beta's order.")):
        status, _, body = gateway.request("POST", "/v1/jobs", {"text": text, "job_id": "order-7"}, key=key)
        assert status == 202 and json.loads(body)["ids"] == ["order-7"], body
    status, _, body = gateway.request("POST", "/v1/jobs", {"text": "Changed.", "job_id": "order-7"}, key=KEY_A)
    assert status == 400 and "already taken" in json.loads(body)["error"]["message"]
    owners = client.owner("acme:order-7"), client.owner("beta:order-7")
    assert [o.tenant for o in owners if o is not None] == ["acme", "beta"]


def test_job_api_status_audio_url_and_spoken_text(gateway: Gateway, s3: S3Endpoint) -> None:
    status, _, body = gateway.request("POST", "/v1/jobs", {"text": "Call 555-0123 at 9am.", "format": "mp3"})
    assert status == 202
    [job_id] = json.loads(body)["ids"]
    deadline = time.monotonic() + 120
    while True:
        _, _, body = gateway.request("GET", f"/v1/jobs/{job_id}")
        st = json.loads(body)
        if st["status"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["status"] == "SUCCESS" and st["format"] == "mp3"
    assert st["spoken_text"] == "Call five five five, zero one two three at nine A M."
    # S3 storage: a presigned HTTPS(-style) URL anyone can GET.
    assert st["audio_url"].startswith(s3.url) and "Signature=" in st["audio_url"]
    assert st["url"] == f"{gateway.url}/v1/jobs/{job_id}/audio"  # not the bucket's s3:// key
    with urllib.request.urlopen(st["audio_url"], timeout=10) as resp:
        via_s3 = resp.read()
    status, headers, direct = gateway.request("GET", f"/v1/jobs/{job_id}/audio")
    assert status == 200 and headers["content-type"] == "audio/mpeg" and direct == via_s3


def test_bad_requests_get_clear_errors(gateway: Gateway) -> None:
    status, _, body = gateway.request("POST", "/v1/jobs", {"text": "hi", "speed": 12})
    assert status == 400 and "speed" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown voice"):
        gateway.sdk().audio.speech.create(model="tts-1", voice="nobody", input="hi")
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        gateway.sdk().audio.speech.create(model="whisper-1", voice="alloy", input="hi")
    with pytest.raises(openai.BadRequestError, match="speed"):
        gateway.sdk().audio.speech.create(model="tts-1", voice="alloy", input="hi", speed=9)
    # A job that fails in the worker: 502 with its reason, not a hang or an empty file.
    with pytest.raises(openai.InternalServerError, match="synthesis failed: JobFailed: text is empty"):
        gateway.sdk().audio.speech.create(model="tts-1", voice="alloy", input="☃☃☃")
    status, _, body = gateway.request("POST", "/v1/jobs", raw=b"{" + b" " * 70000 + b"}")
    assert status == 413
    status, _, _ = gateway.request("POST", "/v1/jobs", raw=b"{not json")
    assert status == 400


def test_operations_routes(gateway: Gateway) -> None:
    status, _, body = gateway.request("GET", "/healthz", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    _, _, body = gateway.request("GET", "/openapi.json", key=None)
    paths = json.loads(body)["paths"]
    assert {"/v1/audio/speech", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/voices"} <= set(paths)
    _, _, docs = gateway.request("GET", "/docs", key=None)
    assert b"swagger" in docs.lower() and b"cdn.jsdelivr" not in docs  # served offline
    _, _, voices = gateway.request("GET", "/v1/voices")
    listed = json.loads(voices)
    assert set(OPENAI_VOICES) <= set(listed["voices"])
    assert {v["name"]: v["seed"] for v in listed["data"] if v["builtin"]} == OPENAI_VOICES
    _, _, metrics = gateway.request("GET", "/metrics", key=None)
    text = metrics.decode()
    assert re.search(r'ttspool_gateway_requests_total\{route="/v1/audio/speech",status="200"\} [1-9]', text), text
    assert "ttspool_gateway_in_flight_requests" in text and "ttspool_gateway_request_seconds_bucket" in text
    assert KEY_A not in gateway.log.read_text()  # no secret in the log
    # Torch-free: no GPU stack in the gateway's address space.
    maps = Path(f"/proc/{gateway.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "libcuda" not in maps


def test_voice_library_routes_and_speech_by_name(gateway: Gateway) -> None:
    name = f"brand-{uuid.uuid4().hex[:8]}"
    status, _, body = gateway.request("POST", "/v1/voices", {"name": name, "seed": 77, "description": "the brand"})
    assert status == 201 and json.loads(body)["version"] == 1, body
    assert gateway.request("POST", "/v1/voices", {"name": name, "seed": 78})[0] == 400  # exists: replace it
    tone = io.BytesIO()
    sf.write(tone, 0.3 * np.sin(np.arange(48_000) / 24_000 * 2 * np.pi * 220), 24_000, format="FLAC")
    recorded = {"name": f"{name}-rec", "audio": base64.b64encode(tone.getvalue()).decode(), "transcript": "Hi there."}
    status, _, body = gateway.request("POST", "/v1/voices", recorded)
    assert status == 201 and json.loads(body)["kind"] == "recording", body
    status, _, body = gateway.request("POST", "/v1/voices", {**recorded, "name": f"{name}-x", "transcript": ""})
    assert status == 400 and b"transcript" in body
    listed = json.loads(gateway.request("GET", "/v1/voices")[2])
    assert {name, f"{name}-rec", "alloy"} <= set(listed["voices"])
    status, _, body = gateway.request("GET", f"/v1/voices/{name}")
    assert status == 200 and json.loads(body)["seed"] == 77
    assert gateway.request("GET", "/v1/voices/no-such-voice")[0] == 404
    assert gateway.request("GET", "/v1/voices", key=None)[0] == 401
    sdk = gateway.sdk()
    for voice in (name, f"{name}-rec"):
        resp = sdk.audio.speech.create(model="tts-1", voice=voice, input="Our brand speaks.", response_format="wav")  # type: ignore[arg-type]
        job_id = resp.response.headers["x-job-ids"]
        job = json.loads(gateway.request("GET", f"/v1/jobs/{job_id}")[2])
        assert job["status"] == "SUCCESS" and _wav_seconds(resp.content) > 0.3
    for voice in (name, f"{name}-rec"):
        status, _, body = gateway.request("DELETE", f"/v1/voices/{voice}")
        assert status == 200 and json.loads(body)["removed"], body
    with pytest.raises(openai.BadRequestError, match="unknown voice"):
        sdk.audio.speech.create(model="tts-1", voice=name, input="Gone.", response_format="wav")  # type: ignore[arg-type]
    assert gateway.request("DELETE", "/v1/voices/alloy")[0] == 403  # built-in: no tenant changes it


def test_speed_mapping() -> None:
    assert [chattts_speed(f) for f in (0.25, 0.5, 0.8, 1.0, 1.2, 1.4, 4.0)] == [0, 0, 3, 5, 7, 9, 9]


def test_one_router_alone_with_its_tenant_overridden(own_broker: LocalRedis, tmp_path: Path) -> None:
    """The job routes on an app of their own, without create_app: state and tenant reach
    them through their dependencies only, so a test can name the tenant without a key."""
    settings = Settings.from_env({"TTSPOOL_BROKER_URL": own_broker.url, "TTSPOOL_STORAGE_URL": f"file://{tmp_path}",
                                  "TTSPOOL_API_KEYS": f"acme={KEY_A}"})
    state = GatewayState(settings, storage_for(settings))
    app = FastAPI()
    app.include_router(routes_jobs.router)
    app.dependency_overrides[gateway_state] = lambda: state
    app.dependency_overrides[tenant_of] = lambda: "beta"
    try:
        with TestClient(app) as http:
            resp = http.post("/v1/jobs", json={"text": "Submitted by the overridden tenant."})
            assert resp.status_code == 202, resp.text
            [job_id] = resp.json()["ids"]
            claim = state.client.owner(f"beta:{job_id}")
            assert claim is not None and claim.tenant == "beta"
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "PENDING"
            assert http.post("/v1/jobs", json={"text": "x", "tenant": "acme"}).status_code == 403
            # The real dependency back: the gateway has keys and this request sends none.
            del app.dependency_overrides[tenant_of]
            assert http.post("/v1/jobs", json={"text": "x"}).status_code == 401
    finally:
        state.client.close()


def test_broker_outage_is_503_not_a_hang(worker: WorkerProc, tmp_path: Path) -> None:
    redis = LocalRedis().start()
    try:
        env = {**worker.env, "TTSPOOL_BROKER_URL": redis.url}
        gw = start_gateway(env, tmp_path / "gateway.log")
        try:
            redis.close()
            t0 = time.monotonic()
            status, headers, _ = gw.request("POST", "/v1/jobs", {"text": "hello"}, key=None)
            assert status == 503 and headers["retry-after"] == "5"
            # /healthz keeps a probe's answer for 2 s: the next probe sees the outage.
            while gw.request("GET", "/healthz", key=None)[0] != 503:
                assert time.monotonic() - t0 < 60
                time.sleep(0.2)
        finally:
            stop_process(gw.proc)
    finally:
        redis.close()


def test_without_keys_only_loopback(worker: WorkerProc) -> None:
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                         cwd=ROOT, env={**worker.env, "TTSPOOL_API_KEYS": ""}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "without API keys" in out.stderr


def test_readme_curl_examples(gateway: Gateway, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- curl-examples", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [c.split("#")[0] for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl ")]
    assert len(commands) == 3
    env = {"KEY": KEY_A, "PATH": "/usr/bin:/bin"}

    def run(cmd: str) -> str:
        cmd = cmd.replace("http://127.0.0.1:8000", gateway.url)
        out = subprocess.run(["bash", "-c", cmd + " --fail-with-body"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
        return out.stdout

    run(commands[0])
    audio, rate = decode((tmp_path / "hello.mp3").read_bytes(), "mp3")
    assert rate == 24000 and len(audio) > 0
    [job_id] = json.loads(run(commands[1]))["ids"]
    deadline = time.monotonic() + 120
    while (st := json.loads(run(commands[2].replace("JOB_ID", job_id))))["status"] != "SUCCESS":
        assert st["status"] in ("PENDING", "STARTED") and time.monotonic() < deadline, st
        time.sleep(0.2)
    assert st["sample_rate"] == 8000 and st["spoken_text"] == "Your code is four eight two nine one three."


@contextmanager
def _browser(downloads: Path | None = None) -> Iterator[Any]:
    """Debian's Chromium, headless, through Selenium; downloads land in `downloads`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


def test_web_page_with_api_keys_in_a_real_browser(gateway: Gateway, tmp_path: Path) -> None:
    """The page as a tenant meets it: it says a key is needed, loads the voices once the
    key is typed, plays back audio as long as the job's, and lists each job with its full
    id, voice and format; its play and download buttons fetch the audio with the key."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    player = "const p = document.getElementById('player');"
    with _browser(tmp_path) as driver:
        driver.get(gateway.url + "/")
        assert driver.title == "ttspool"
        WebDriverWait(driver, 30).until(lambda d: "needs an API key" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "status").get_attribute("class") == "error"
        text = driver.find_element(By.ID, "text")
        assert text.get_attribute("placeholder") != text.get_attribute("value")
        key = driver.find_element(By.ID, "key")
        key.send_keys(KEY_A)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        WebDriverWait(driver, 30).until(lambda d: len(Select(d.find_element(By.ID, "voice")).options) >= len(OPENAI_VOICES))
        assert driver.find_element(By.ID, "status").text == ""
        voice = Select(driver.find_element(By.ID, "voice")).first_selected_option.get_attribute("value")
        # A whole file, MP3 streamed into Media Source Extensions, and a long text whose
        # segments (raw PCM each) the row's buttons turn into WAV.
        for fmt, words in (("wav", "The page speaks wav, quickly and clearly."),
                           ("mp3", "The page speaks mp3, quickly and clearly."), ("wav", LONG)):
            driver.execute_script("arguments[0].value = arguments[1]", text, words)
            Select(driver.find_element(By.ID, "format")).select_by_value(fmt)
            rows = len(driver.find_elements(By.CSS_SELECTOR, "#jobs tr"))
            driver.find_element(By.ID, "speak").click()
            WebDriverWait(driver, 180).until(lambda d: d.find_element(By.ID, "status").text.startswith("done")
                                             or "error" in d.find_element(By.ID, "status").get_attribute("class"))
            assert driver.find_element(By.ID, "status").text.startswith("done"), driver.find_element(By.ID, "status").text
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tr")) > rows)
            listed = driver.find_elements(By.CSS_SELECTOR, "#jobs tr")
            new = listed[:len(listed) - rows]  # the newest on top
            statuses = [json.loads(gateway.request("GET", f"/v1/jobs/{r.get_attribute('data-job')}")[2]) for r in new]
            assert all(st["status"] == "SUCCESS" for st in statuses) and (len(new) >= 2) == (words == LONG)
            total = sum(st["duration_s"] for st in statuses)
            duration = WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                player + "return isFinite(p.duration) && p.duration > 0 ? p.duration : null"))
            assert abs(duration - total) < 0.1 * len(new), (fmt, duration, total)
            # It plays: the clock of the media element moves.
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(player + "return p.currentTime > 0 || p.ended"))
            # Each row says which job, made with which voice, in which format.
            row, status = new[0], statuses[0]
            job_id = row.get_attribute("data-job")
            job_fmt = fmt if len(new) == 1 else "pcm"
            cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
            assert status["voice"]["name"] == voice and status["format"] == job_fmt
            assert cells[:4] == [job_id, f"{voice} v{status['voice']['version']}", job_fmt, "SUCCESS"], cells
            assert len(job_id) == 32  # the whole id, as X-Job-Ids names it
            # Play from the row: the job's audio fetched with the key, a blob: source.
            before = driver.execute_script(player + "return p.src")
            row.find_element(By.CSS_SELECTOR, "button.play").click()
            played = WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                player + "return p.src !== arguments[0] && p.src.startsWith('blob:') && isFinite(p.duration)"
                " && p.duration > 0 ? p.duration : null", before))
            assert abs(played - status["duration_s"]) < 0.1, (fmt, played)
            # Download: the job's audio (a PCM segment with a WAV header), under the job's id.
            row.find_element(By.CSS_SELECTOR, "button.download").click()
            saved = tmp_path / f"{job_id}.{'wav' if job_fmt == 'pcm' else job_fmt}"
            WebDriverWait(driver, 30).until(lambda d: saved.exists() and not list(tmp_path.glob("*.crdownload")))
            stored = gateway.request("GET", f"/v1/jobs/{job_id}/audio")[2]
            if job_fmt == "pcm":
                assert saved.read_bytes()[44:] == stored and _wav_seconds(saved.read_bytes()) == len(stored) / 48000
            else:
                assert saved.read_bytes() == stored
        assert KEY_A not in gateway.log.read_text()


def test_docs_declare_the_api_key_and_the_job_fields(gateway: Gateway) -> None:
    """/openapi.json names the bearer scheme on the tenants' routes and the job's fields;
    in the browser, Swagger UI's Authorize takes a key and "Try it out" then works."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    doc = json.loads(gateway.request("GET", "/openapi.json", key=None)[2])
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["ApiKey"]["description"]}
    for path, method in (("/v1/jobs", "post"), ("/v1/jobs/{job_id}", "get"), ("/v1/audio/speech", "post"),
                         ("/v1/voices", "get")):
        assert doc["paths"][path][method]["security"] == [{"ApiKey": []}], path
    assert "security" not in doc["paths"]["/healthz"]["get"]
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    shape = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert shape["anyOf"] == [{"$ref": "#/components/schemas/JobSpec"},
                              {"type": "array", "items": {"$ref": "#/components/schemas/JobSpec"}, "minItems": 1}]
    job = doc["components"]["schemas"]["JobSpec"]
    assert {"text", "voice", "speed", "format", "job_id", "priority", "ttl_s"} <= set(job["properties"])
    assert job["required"] == ["text"] and "wav-ulaw-8k" in job["properties"]["format"]["enum"]

    with _browser() as driver:
        driver.get(gateway.url + "/docs")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.btn.authorize"))[0].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".auth-container input"))[0].send_keys(KEY_A)
        driver.find_element(By.CSS_SELECTOR, ".auth-container button.authorize").click()
        driver.find_element(By.CSS_SELECTOR, "button.btn-done").click()
        op = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#operations-default-voices_v1_voices_get"))[0]
        op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda d: op.find_elements(By.CSS_SELECTOR, "button.try-out__btn"))[0].click()
        wait.until(lambda d: op.find_elements(By.CSS_SELECTOR, "button.execute"))[0].click()
        status = wait.until(lambda d: op.find_elements(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
        assert status[0].text.strip().startswith("200"), status[0].text


def test_sse_stream_through_the_openai_sdk(gateway: Gateway) -> None:
    """`stream_format: "sse"` as OpenAI serves it: speech.audio.delta events whose audio,
    joined, is the audio stream's bytes, then speech.audio.done with the usage."""
    with gateway.sdk().audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="echo", input=LONG, response_format="wav", stream_format="sse",
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        ids = resp.headers["x-job-ids"].split(",")
        events = [json.loads(line[len("data: "):]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert len(ids) >= 2 and [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    expected, seconds = b"", 0.0
    for job_id in ids:
        expected += gateway.request("GET", f"/v1/jobs/{job_id}/audio")[2]
        seconds += json.loads(gateway.request("GET", f"/v1/jobs/{job_id}")[2])["duration_s"]
    assert data[44:] == expected
    usage = events[-1]["usage"]
    assert usage == {"input_tokens": len(LONG), "output_tokens": round(seconds * 46.875),
                     "total_tokens": len(LONG) + round(seconds * 46.875)}
    with pytest.raises(openai.BadRequestError, match="flac cannot be streamed"):
        gateway.sdk().audio.speech.create(model="tts-1", voice="echo", input="hi", response_format="flac",
                                          stream_format="sse")


def test_local_folder_storage_gives_tenants_gateway_urls(s3: S3Endpoint, aws_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """With a local folder for storage, a job's `url` and `audio_url` are this gateway's
    route (which takes the key), never the server's file:// path."""
    folder = tmp_path / "out"
    # A Redis of its own: the S3 worker of the other tests must not take these jobs.
    redis = LocalRedis().start()
    env = worker_env(redis.url, s3, aws_env, TTSPOOL_STORAGE_URL=f"file://{folder}")
    try:
        with running_worker(env, tmp_path / "worker.log"):
            gw = start_gateway(env, tmp_path / "gateway.log", TTSPOOL_API_KEYS=f"acme={KEY_A}")
            try:
                status, _, body = gw.request("POST", "/v1/jobs", {"text": "Kept in a folder.", "format": "flac"})
                assert status == 202, body
                [job_id] = json.loads(body)["ids"]
                deadline = time.monotonic() + 120
                while (st := json.loads(gw.request("GET", f"/v1/jobs/{job_id}")[2]))["status"] != "SUCCESS":
                    assert st["status"] in ("PENDING", "STARTED") and time.monotonic() < deadline, st
                    time.sleep(0.2)
                own = f"{gw.url}/v1/jobs/{job_id}/audio"
                assert st["url"] == own and st["audio_url"] == own, st
                assert str(folder) not in json.dumps(st)
                status, headers, audio = gw.request("GET", own[len(gw.url):])
                assert status == 200 and headers["content-type"] == "audio/flac"
                assert _wav_seconds(audio) == pytest.approx(st["duration_s"], abs=1e-3)
                assert gw.request("GET", own[len(gw.url):], key=None)[0] == 401
            finally:
                stop_process(gw.proc)
    finally:
        redis.close()


def test_300_concurrent_requests_on_one_gateway(gateway: Gateway) -> None:
    """Held at once on one process, each answered with its audio; memory stays bounded."""
    import asyncio

    import httpx

    def rss() -> float:
        text = gateway.request("GET", "/metrics", key=None)[2].decode()
        return float(re.search(r"^process_resident_memory_bytes (\S+)", text, re.M)[1])  # type: ignore[index]

    async def load() -> list[tuple[int, int]]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=gateway.url, limits=limits, timeout=600,
                                     headers={"Authorization": f"Bearer {KEY_B}"}) as http:
            async def one(i: int) -> tuple[int, int]:
                r = await http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "response_format": "pcm",
                                                             "input": f"Load {'abcdefghij'[i % 10]} {'xyz'[i % 3]} {i}."})
                return r.status_code, len(r.content)
            return await asyncio.gather(*(one(i) for i in range(300)))

    before = rss()
    results = asyncio.run(load())
    assert [s for s, _ in results].count(200) == 300, [s for s, _ in results if s != 200][:5]
    assert all(size > 1000 and size % 2 == 0 for _, size in results)
    assert rss() - before < 200 * 2**20
    assert gateway.request("GET", "/healthz", key=None)[0] == 200


def test_bench_gateway_mode(gateway: Gateway, worker: WorkerProc, tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "tasks.cli", "bench", "--gateway", gateway.url, "--key", KEY_B,
                               "--jobs", "6", "--concurrency", "6", "--json-out", str(out)],
                              cwd=ROOT, env=worker.env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"bench hung: {err.stderr!r}\n{gateway.log.read_text()[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "added by the gateway" in proc.stdout and "first audio after" in proc.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == 0 and result["jobs"] == 6
    s = result["stream"]
    assert s["segments"] >= 2 and 0 < s["first_audio_s"] <= s["total_s"] and s["audio_s"] > 0
    assert result["gateway_rss_bytes"]["after"] > 0

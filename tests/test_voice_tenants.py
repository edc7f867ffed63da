"""Voices belong to tenants (docs/VOICES.md): two tenants, acme and beta, and the
operator's shared space, through the Python API, the CLI, the gateway (served for real,
with two API keys and an admin key) and a real worker. What a job was made with is read
from its result's `voice` label and from the worker's record of which recording went
into the prompt, not from the audio (random weights make noise)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from storage import storage_for
from tasks.producer import Client
from tasks.schema import JobValidationError, parse_job
from tasks.settings import QUEUE_BULK, TASK_NAME, Settings
from tasks.voices import INDEX_KEY, OPENAI_VOICES, VoiceError, VoiceLibrary, VoiceNotFound, VoiceReadOnly

from .conftest import LocalRedis, S3Endpoint, WorkerProc, run_cli, stop_process, worker_env
from .test_gateway import KEY_A, KEY_B, Gateway, start_gateway
from .test_voices import _name, _tone

KEY_OPS = "ops-key-0123456789abcdef"


@pytest.fixture()
def settings(redis_server: LocalRedis, s3: S3Endpoint, aws_env: dict[str, str]) -> Settings:
    return Settings.from_env(worker_env(redis_server.url, s3, aws_env))


@pytest.fixture()
def shared(settings: Settings) -> Iterator[VoiceLibrary]:
    """The operator's library: the shared space."""
    index = redis.Redis.from_url(settings.broker_url)
    yield VoiceLibrary(storage_for(settings), index)
    index.close()


@pytest.fixture(scope="module")
def gateway(worker: WorkerProc, tmp_path_factory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    gw = start_gateway(worker.env, log, TTSPOOL_API_KEYS=f"acme={KEY_A},beta={KEY_B}",
                       TTSPOOL_ADMIN_KEYS=f"ops={KEY_OPS}")
    yield gw
    stop_process(gw.proc)


def _json(gateway: Gateway, method: str, path: str, key: str | None, body: object = None) -> tuple[int, Any]:
    status, _, raw = gateway.request(method, path, body, key=key)
    return status, json.loads(raw)


def _label(client: Client, job_id: str) -> dict[str, Any]:
    meta = client.app.backend.get_task_meta(job_id)
    assert meta["status"] == "SUCCESS", meta
    label: dict[str, Any] = meta["result"]["voice"]
    return label


# -- the Python API ----------------------------------------------------------------------


def test_every_verb_in_two_tenant_spaces(shared: VoiceLibrary, settings: Settings) -> None:
    acme, beta = shared.scoped("acme"), shared.scoped("beta")
    name, common = _name("narrator"), _name("house")
    shared.add(common, seed=5, description="everyone's")
    added = acme.add(name, seed=42, description="acme's narrator")
    assert (added.version, added.space, added.tenant) == (1, "tenant", "acme")
    assert added.label == {"name": name, "version": 1, "space": "tenant", "tenant": "acme"}
    # beta cannot see acme's voice: not by name, not in its list, and not its description.
    assert beta.get(name) is None and beta.get(name, fresh=True) is None
    assert name not in {v.name for v in beta.list()}
    with pytest.raises(VoiceNotFound):
        beta.remove(name)
    # Nor can the shared space (jobs without a tenant).
    assert shared.get(name) is None
    listed = {v.name: v for v in acme.list()}
    assert listed[name].space == "tenant" and listed[common].space == "shared" and listed["alloy"].space == "builtin"
    assert set(OPENAI_VOICES) <= set(listed)
    # beta's voice of the same name is its own: acme's stays as it was.
    assert beta.add(name, seed=43).version == 1
    assert beta.add(name, seed=44, replace=True).version == 2
    assert (acme.get(name).embedding.seed, acme.get(name, fresh=True).version) == (42, 1)
    assert beta.remove(name).version == 2
    assert acme.require(name).embedding.seed == 42
    # Shared voices and built-ins: every tenant uses them, none changes them.
    assert acme.get(common).space == beta.get(common).space == "shared"
    with pytest.raises(VoiceReadOnly, match="shared voice"):
        beta.remove(common)
    with pytest.raises(VoiceReadOnly, match="built-in voice"):
        beta.remove("alloy")
    with pytest.raises(VoiceError, match="exists as a shared voice"):
        beta.add(common, seed=6)
    with pytest.raises(VoiceError, match="exists as a built-in voice"):
        beta.add("alloy", seed=6)
    # With replace, a tenant puts its own voice in place of a shared or built-in one, for
    # its own jobs only; removing it shows the shared or built-in one again.
    own = beta.add(common, seed=9, replace=True)
    assert (own.version, own.space) == (1, "tenant")
    assert beta.get(common).embedding.seed == 9 and acme.get(common).embedding.seed == 5
    assert shared.get(common, fresh=True).embedding.seed == 5
    assert beta.add("alloy", seed=3, replace=True).tenant == "beta"
    assert acme.get("alloy").builtin and shared.get("alloy").builtin and beta.get("alloy").embedding.seed == 3
    beta.remove(common)
    beta.remove("alloy")
    assert beta.get(common).space == "shared" and beta.get("alloy").builtin
    # A mix in acme's space takes acme's, shared and built-in voices.
    blend = acme.add(_name("blend"), mix=f"{name}:0.5,{common}:0.3,alloy:0.2")
    assert [p.source for p in blend.embedding.mix] == [f"{name}@1", f"{common}@1", "alloy@0"]
    with pytest.raises(VoiceNotFound):
        beta.add(_name("blend"), mix=f"{name}:0.5,alloy:0.5")
    acme.remove(blend.name)
    acme.remove(name)
    shared.remove(common)


def test_spaces_in_the_store_and_in_redis(shared: VoiceLibrary, settings: Settings) -> None:
    """A tenant's space cannot collide with a shared voice's recording folder, even a
    shared voice named like the tenant; each space has its own Redis index."""
    store = storage_for(settings)
    acme = shared.scoped("acme")
    name = _name("rec")
    shared.add("acme", recording=_tone(2.0), transcript="The shared voice named acme.", replace=True)
    voice = acme.add(name, recording=_tone(2.0), transcript="Acme's own recording.")
    assert voice.recording.key == f"tenants/acme/voices/{name}/v1.wav"
    assert store.exists(f"tenants/acme/voices/{name}.json") and not store.exists(f"voices/{name}.json")
    assert shared.get("acme").recording.key == "voices/acme/v1.wav"
    index = shared.index
    assert index is not None
    assert index.hget("ttspool:tenant-voices:acme", name) is not None and index.hget(INDEX_KEY, name) is None
    shared.remove("acme")
    assert not store.list_keys("voices/acme/") and store.exists(voice.recording.key)
    assert acme.recording_audio(voice)[:4] == b"RIFF"
    # A producer without store credentials sees each tenant's index only for that tenant.
    bare = VoiceLibrary(None, index)
    assert bare.scoped("acme").get(name) is not None and bare.scoped("beta").get(name) is None
    # A flushed Redis: the next reader with a store refills the space's index, and a
    # worker's start refills every space (reindex), for producers without a store.
    index.delete("ttspool:tenant-voices:acme")
    assert bare.scoped("acme").get(name) is None
    assert shared.reindex() >= 1
    assert bare.scoped("acme").get(name).version == 1
    acme.remove(name)
    assert not store.list_keys(f"tenants/acme/voices/{name}")
    assert bare.scoped("acme").get(name) is None
    with pytest.raises(VoiceError, match="tenant"):
        shared.scoped("../beta")


def test_voice_in_the_old_layout_is_a_shared_voice(shared: VoiceLibrary, settings: Settings) -> None:
    """Voices written before spaces (voices/<name>.json, voices/<name>/v<N>.wav, indexed in
    ttspool:voices) are the shared space as they are: no migration."""
    store = storage_for(settings)
    name, rec = _name("legacy"), _name("legacy-rec")
    record = {"name": name, "version": 3, "kind": "seed", "embedding": {"seed": 31, "speaker": None, "mix": None},
              "recording": None, "description": "written before spaces", "created_at": 1.0, "builtin": False}
    store.put_bytes(f"voices/{name}.json", json.dumps(record, indent=1).encode(), "application/json")
    wav = _tone(2.0)
    store.put_bytes(f"voices/{rec}/v1.wav", wav, "audio/wav")
    store.put_bytes(f"voices/{rec}.json", json.dumps({
        "name": rec, "version": 1, "kind": "recording", "embedding": None,
        "recording": {"key": f"voices/{rec}/v1.wav", "sha256": "0" * 64, "transcript": "Old words.",
                      "duration_s": 2.0},
        "description": "", "created_at": 1.0, "builtin": False}).encode(), "application/json")
    index = shared.index
    assert index is not None
    # Redis as the code before spaces left it: an entry of the old shape, no completeness mark.
    index.delete(INDEX_KEY)
    index.hset(INDEX_KEY, "alloy", json.dumps({**record, "name": "alloy", "version": 0, "builtin": True,
                                               "embedding": {"seed": OPENAI_VOICES["alloy"]}}))
    for library in (shared, shared.scoped("acme"), shared.scoped("beta")):
        found = library.require(name)
        assert (found.space, found.version, found.embedding.seed) == ("shared", 3, 31)
        assert found.label == {"name": name, "version": 3, "space": "shared"}
        assert library.get(rec).recording.transcript == "Old words."
    assert shared.recording_audio(shared.require(rec)) == wav
    assert VoiceLibrary(None, index, "acme").get(name).version == 3  # the index was refilled
    with pytest.raises(VoiceReadOnly):
        shared.scoped("acme").remove(name)
    assert shared.remove(name).version == 3 and shared.remove(rec).version == 1
    assert not store.list_keys(f"voices/{rec}/")


def test_producer_checks_names_in_the_jobs_tenant_space(shared: VoiceLibrary, settings: Settings) -> None:
    name = _name("acme-only")
    shared.scoped("acme").add(name, seed=12)
    client = Client(settings)  # no store: the indexes and the built-ins
    try:
        before = client.redis.llen(QUEUE_BULK)
        assert client.unknown_voices([]) == {}
        with pytest.raises(JobValidationError, match=f"unknown voice {name!r}"):
            client.submit_many([{"text": "Beta tries acme's voice.", "voice": name, "tenant": "beta"}])
        with pytest.raises(JobValidationError, match=f"unknown voice {name!r}"):
            client.submit_many([{"text": "No tenant: the shared space.", "voice": name}])
        assert client.redis.llen(QUEUE_BULK) == before
        specs = [parse_job({"text": "hi", "voice": name, "tenant": "acme"}),
                 parse_job({"text": "hi", "voice": "alloy", "tenant": "beta"})]
        assert client.unknown_voices(specs) == {}
    finally:
        client.close()
        shared.scoped("acme").remove(name)


def test_cli_manages_the_shared_space_and_names_a_tenant(worker: WorkerProc) -> None:
    name = _name("cli")
    added = run_cli(worker.env, "voice", "add", name, "--seed", "8", "--tenant", "acme", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["space"] == "tenant" and json.loads(added.stdout)["tenant"] == "acme"
    mine = json.loads(run_cli(worker.env, "voice", "list", "--tenant", "acme", "--json").stdout)
    everyone = json.loads(run_cli(worker.env, "voice", "list", "--json").stdout)
    assert {v["name"]: v["space"] for v in mine}[name] == "tenant"
    assert name not in {v["name"] for v in everyone} and {v["space"] for v in everyone} <= {"shared", "builtin"}
    refused = run_cli(worker.env, "voice", "rm", "alloy", "--tenant", "acme")
    assert refused.returncode != 0 and "built-in voice" in refused.stderr
    assert run_cli(worker.env, "voice", "rm", name).returncode != 0  # not in the shared space
    assert run_cli(worker.env, "voice", "rm", name, "--tenant", "acme").returncode == 0


# -- the gateway --------------------------------------------------------------------------


def test_gateway_every_verb_across_two_tenants(gateway: Gateway, worker: WorkerProc, client: Client) -> None:
    name, common = _name("narrator"), _name("house")
    status, body = _json(gateway, "POST", "/v1/voices", KEY_OPS, {"name": common, "seed": 5})
    assert status == 201 and body["space"] == "shared", body
    status, body = _json(gateway, "POST", "/v1/voices", KEY_A, {"name": name, "seed": 42, "description": "acme's"})
    assert status == 201 and (body["space"], body["tenant"]) == ("tenant", "acme"), body
    # beta sees nothing of acme's voice: not listed, not readable, not removable.
    status, listed = _json(gateway, "GET", "/v1/voices", KEY_B)
    assert status == 200 and name not in listed["voices"] and "acme's" not in json.dumps(listed)
    assert {v["name"]: v["space"] for v in listed["data"]}[common] == "shared"
    assert {v["name"] for v in listed["data"] if v["space"] == "builtin"} == set(OPENAI_VOICES)
    assert gateway.request("GET", f"/v1/voices/{name}", key=KEY_B)[0] == 404
    assert gateway.request("GET", "/v1/audio/voices", key=KEY_B)[0] == 200
    assert gateway.request("DELETE", f"/v1/voices/{name}", key=KEY_B)[0] == 404
    assert gateway.request("GET", "/v1/voices?tenant=acme", key=KEY_B)[0] == 403
    assert gateway.request("GET", "/v1/voices", key=None)[0] == 401
    # beta's voice of the same name, replaced: its own, acme's unchanged.
    assert _json(gateway, "POST", "/v1/voices", KEY_B, {"name": name, "seed": 43})[0] == 201
    status, body = _json(gateway, "POST", "/v1/voices", KEY_B, {"name": name, "seed": 44, "replace": True})
    assert status == 201 and (body["version"], body["tenant"]) == (2, "beta")
    status, body = _json(gateway, "GET", f"/v1/voices/{name}", KEY_A)
    assert (status, body["version"], body["seed"], body["tenant"]) == (200, 1, 42, "acme")
    # Shared and built-in voices: 403 for a tenant's removal, 400 for an add without replace.
    for voice in (common, "alloy"):
        assert gateway.request("DELETE", f"/v1/voices/{voice}", key=KEY_B)[0] == 403
        status, body = _json(gateway, "POST", "/v1/voices", KEY_B, {"name": voice, "seed": 6})
        assert status == 400 and "exists as a" in body["error"]["message"]
    assert _json(gateway, "GET", f"/v1/voices/{common}", KEY_OPS)[1]["seed"] == 5
    # beta's own alloy (replace) is beta's alone: acme's default voice stays the built-in.
    status, body = _json(gateway, "POST", "/v1/voices", KEY_B, {"name": "alloy", "seed": 3, "replace": True})
    assert status == 201 and body["tenant"] == "beta", body
    assert _json(gateway, "GET", "/v1/voices/alloy", KEY_A)[1]["space"] == "builtin"
    labels = {}
    for key, voice in ((KEY_A, "alloy"), (KEY_B, "alloy"), (KEY_A, name), (KEY_B, name), (KEY_B, common)):
        status, headers, _ = gateway.request("POST", "/v1/audio/speech", {
            "model": "tts-1", "input": "Whose voice is this?", "voice": voice, "response_format": "wav"}, key=key)
        assert status == 200
        own_id = {k.lower(): v for k, v in headers.items()}["x-job-ids"]
        labels[(key, voice)] = _label(client, f"{'acme' if key == KEY_A else 'beta'}:{own_id}")  # the task id
    assert labels[(KEY_A, "alloy")] == {"name": "alloy", "version": 0, "space": "builtin"}
    assert labels[(KEY_B, "alloy")] == {"name": "alloy", "version": 1, "space": "tenant", "tenant": "beta"}
    assert labels[(KEY_A, name)] == {"name": name, "version": 1, "space": "tenant", "tenant": "acme"}
    assert labels[(KEY_B, name)] == {"name": name, "version": 2, "space": "tenant", "tenant": "beta"}
    assert labels[(KEY_B, common)] == {"name": common, "version": 1, "space": "shared"}
    # The admin key manages the shared space, and a tenant's by name.
    status, body = _json(gateway, "GET", "/v1/voices?tenant=acme", KEY_OPS)
    assert {v["name"]: v.get("tenant") for v in body["data"]}[name] == "acme"
    assert name not in _json(gateway, "GET", "/v1/voices", KEY_OPS)[1]["voices"]
    assert gateway.request("GET", "/v1/voices?tenant=..%2Fbeta", key=KEY_OPS)[0] == 400
    assert gateway.request("DELETE", f"/v1/voices/{name}?tenant=beta", key=KEY_OPS)[0] == 200
    assert gateway.request("DELETE", "/v1/voices/alloy", key=KEY_B)[0] == 200  # its own shadow
    assert _json(gateway, "GET", "/v1/voices/alloy", KEY_B)[1]["space"] == "builtin"
    status, body = _json(gateway, "POST", "/v1/jobs", KEY_B, {"text": "Beta asks for acme's.", "voice": name})
    assert status == 400 and "unknown voice" in body["error"]["message"]
    assert gateway.request("DELETE", f"/v1/voices/{name}", key=KEY_A)[0] == 200
    assert gateway.request("DELETE", f"/v1/voices/{common}", key=KEY_OPS)[0] == 200
    assert KEY_OPS not in gateway.log.read_text()


def test_gateway_without_keys_is_the_operator(worker: WorkerProc, tmp_path: Path) -> None:
    name = _name("local")
    gw = start_gateway(worker.env, tmp_path / "gateway.log", TTSPOOL_API_KEYS="")
    try:
        status, body = _json(gw, "POST", "/v1/voices", None, {"name": name, "seed": 2})
        assert status == 201 and body["space"] == "shared"
        assert gw.request("DELETE", "/v1/voices/alloy", key=None)[0] == 403
        assert gw.request("DELETE", f"/v1/voices/{name}", key=None)[0] == 200
    finally:
        stop_process(gw.proc)
    # Admin keys without API keys: reading is open (loopback only), changing takes the key.
    gw = start_gateway(worker.env, tmp_path / "gateway2.log", TTSPOOL_API_KEYS="", TTSPOOL_ADMIN_KEYS=f"ops={KEY_OPS}")
    try:
        assert gw.request("GET", "/v1/voices", key=None)[0] == 200
        assert gw.request("POST", "/v1/voices", {"name": name, "seed": 2}, key=None)[0] == 403
        assert gw.request("POST", "/v1/voices", {"name": name, "seed": 2}, key=KEY_OPS)[0] == 201
        assert gw.request("DELETE", f"/v1/voices/{name}", key=KEY_OPS)[0] == 200
    finally:
        stop_process(gw.proc)


# -- a real worker ---------------------------------------------------------------------------


def test_queued_job_keeps_its_tenants_voice(worker: WorkerProc, client: Client, shared: VoiceLibrary) -> None:
    """The issue's probe: beta adds, replaces and removes a voice of acme's voice's name
    while acme's job waits in the queue (the worker stopped with SIGSTOP, so the job is
    still a message in Redis); acme's job runs with acme's voice."""
    acme, beta = shared.scoped("acme"), shared.scoped("beta")
    name = _name("acme-narrator")
    acme.add(name, recording=_tone(2.0), transcript="Acme's own narrator speaks.")
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        [queued] = client.submit_many([{"text": "Queued for acme.", "voice": name, "tenant": "acme"}])
        beta.add(name, recording=_tone(3.0), transcript="Beta's impostor speaks.")
        beta.add(name, recording=_tone(4.0), transcript="Beta's impostor, again.", replace=True)
        with pytest.raises(VoiceNotFound):
            beta.remove(f"{name}-x")
        assert beta.remove(name).version == 2
        beta.add(name, recording=_tone(3.0), transcript="Beta's impostor speaks.")
        with pytest.raises(VoiceReadOnly):
            beta.remove("alloy")
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    assert client.wait([queued], timeout=300)[0].status == "SUCCESS"
    assert _label(client, queued) == {"name": name, "version": 1, "space": "tenant", "tenant": "acme"}
    [mine] = client.submit_many([{"text": "Beta's own job.", "voice": name, "tenant": "beta"}])
    assert client.wait([mine], timeout=300)[0].status == "SUCCESS"
    assert _label(client, mine) == {"name": name, "version": 1, "space": "tenant", "tenant": "beta"}
    # Which recording went into each prompt: acme's 2 s clip, beta's 3 s one.
    log = worker.log_text()
    assert re.search(rf"voice {re.escape(name)} v1: \d+ reference codes from its 2\.0 s recording \(tenant acme\)", log)
    assert re.search(rf"voice {re.escape(name)} v1: \d+ reference codes from its 3\.0 s recording \(tenant beta\)", log)
    assert not re.search(rf"voice {re.escape(name)} v\d: \d+ reference codes from its 4\.0 s", log)
    # A job without a tenant (a plain Celery client) sees the shared space: no such voice.
    job_id = _name("job")
    client.app.send_task(TASK_NAME, kwargs={"text": "No tenant.", "voice": name}, task_id=job_id, queue=QUEUE_BULK)
    failed = client.wait([job_id], timeout=120)[0]
    assert failed.status == "FAILURE" and f"voice {name!r} is not in the voice library" in failed.error
    acme.remove(name)
    beta.remove(name)
    # The content keys differ by the voice's digest, not by the space: tenant and
    # shared voices that sound the same share audio, those that do not never do.
    same = _name("same")
    shared.add(same, seed=77)
    acme.add(same, seed=77, replace=True)
    beta.add(same, seed=78, replace=True)
    ids = [client.submit_many([{"text": "One line, three spaces.", "voice": same, **t}])[0]
           for t in ({}, {"tenant": "acme"}, {"tenant": "beta"})]
    results = client.wait(ids, timeout=300)
    assert [r.status for r in results] == ["SUCCESS"] * 3
    assert results[0].url == results[1].url != results[2].url
    assert [_label(client, r.id).get("tenant") for r in results] == [None, "acme", "beta"]
    for library in (acme, beta, shared):
        library.remove(same)

"""`ttspool model ...` and the node's model cache: resume after kill -9, one download per
node under concurrent fetches, S3 and local-folder sources, signed manifests, list and
prune, and a worker engine loading a model fetched on first use."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from storage.models.cache import fetch_model, list_models, model_dir, prune
from storage.models.manifest import ManifestError, parse_manifest, sha256_file
from workers.bench.range_server import RangeServer
from tasks.cli import main
from workers.engine.assets import ModelFetch, resolve
from tasks.cli.local_redis import LocalRedis, free_port
from tests.conftest import ROOT, S3Endpoint, start_worker, stop_process
from tests.scrape import fetch, parse, value, wait_for
from tests.model_mirror import (BIG, BIG_SIZE, MiB, assert_verified, big_export, mirror,  # noqa: F401 (fixtures)
                                mirror_copy, tiny_export)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tasks.cli", "model", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode()


def _requested_bytes(ranges: list[str | None], size: int) -> int:
    """Bytes a client asked for: the Range probe and whole-file GETs count in full."""
    total = 0
    for r in ranges:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", r or "")
        total += size if m is None else (int(m[2]) if m[2] else size - 1) - int(m[1]) + 1
    return total


def test_kill_9_mid_download_then_rerun_resumes(big_export: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    partial_state = model_dir(cache, "random-tiny-big", None) / (BIG + ".partial.json")
    # 2 MiB/s per connection: the 96 MiB file takes seconds, so the kill lands mid-body.
    with RangeServer(big_export, rate_bps=2 * MiB) as server:
        proc = _cli("fetch", "--source", server.url, "--cache-dir", str(cache))
        try:
            deadline = time.monotonic() + 120
            done = 0
            while done < 12 * MiB:
                assert proc.poll() is None and time.monotonic() < deadline, "fetch ended before the kill"
                try:
                    done = sum(s[2] for s in json.loads(partial_state.read_text())["segments"])
                except (OSError, ValueError):
                    pass
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        first_run = len(server.requests)
        server.rate_bps = None
        out = _finish(_cli("fetch", "--source", server.url, "--cache-dir", str(cache)))
        second = [r for p, r in server.requests[first_run:] if p == BIG]
    assert "resuming" in out
    assert 0 < _requested_bytes(second, BIG_SIZE) < BIG_SIZE - 12 * MiB + 1
    assert_verified(model_dir(cache, "random-tiny-big", None), big_export)


def test_two_fetches_at_once_download_each_file_once(tiny_export: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    with RangeServer(tiny_export, rate_bps=40 * MiB) as server:
        procs = [_cli("fetch", "--source", server.url, "--cache-dir", cache) for _ in range(2)]
        outs = [_finish(p) for p in procs]
        sent = dict(server.bytes_sent)
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1
    for rel, entry in parse_manifest((tiny_export / "manifest.json").read_bytes()).files.items():
        assert sent[rel] == entry.size + 1, rel  # the 1-byte Range probe, then the file once
    assert_verified(Path(outs[0].strip().splitlines()[-1]), tiny_export)


def test_s3_source(s3: S3Endpoint, tiny_export: Path, tmp_path: Path) -> None:
    client = s3.client()
    for path in tiny_export.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3.bucket, f"mirror/random-tiny/{path.relative_to(tiny_export).as_posix()}")
    target = fetch_model(f"s3://{s3.bucket}/mirror/random-tiny", tmp_path / "cache", tty=False,
                         s3_endpoint_url=s3.url)
    assert_verified(target, tiny_export)
    # A poisoned object is refetched, then refused with the file's name.
    client.put_object(Bucket=s3.bucket, Key="mirror/random-tiny/ttspool.json", Body=b"{}")
    with pytest.raises(RuntimeError, match=r"ttspool\.json from s3://.*sha256 mismatch on all 2 attempts"):
        fetch_model(f"s3://{s3.bucket}/mirror/random-tiny", tmp_path / "other", attempts=2, tty=False,
                    s3_endpoint_url=s3.url)


def test_local_folder_source_hard_links_and_reuses_the_cache(tiny_export: Path, tmp_path: Path) -> None:
    target = fetch_model(str(tiny_export), tmp_path, model="random-tiny", tty=False)
    assert_verified(target, tiny_export)
    assert (target / "asset/Vocos.safetensors").stat().st_ino == (tiny_export / "asset/Vocos.safetensors").stat().st_ino
    mtime = (target / "asset/Vocos.safetensors").stat().st_mtime_ns
    assert fetch_model(str(tiny_export), tmp_path, tty=False) == target
    assert (target / "asset/Vocos.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ManifestError, match="serves model 'random-tiny', not 'chattts'"):
        fetch_model(str(tiny_export), tmp_path, model="chattts", tty=False)


def _signed_mirror(tiny_export: Path, dest: Path) -> tuple[Path, Path]:
    served = mirror_copy(tiny_export, dest / "mirror")
    key = Ed25519PrivateKey.generate()
    (served / "manifest.json.sig").write_bytes(key.sign((served / "manifest.json").read_bytes()))
    pub = dest / "pub.pem"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return served, pub


def test_signed_manifest_is_checked(tiny_export: Path, tmp_path: Path) -> None:
    served, pub = _signed_mirror(tiny_export, tmp_path)
    with RangeServer(served) as server:
        assert_verified(fetch_model(server.url, tmp_path / "ok", pubkey=pub, tty=False), tiny_export)
        # A poisoned mirror: one digest swapped for the attacker's file, same signature.
        doc = json.loads((served / "manifest.json").read_text())
        doc["files"]["ttspool.json"]["sha256"] = "0" * 64
        (served / "manifest.json").unlink()
        (served / "manifest.json").write_text(json.dumps(doc))
        requests = len(server.requests)
        with pytest.raises(ManifestError, match="signature does not verify"):
            fetch_model(server.url, tmp_path / "bad", pubkey=pub, tty=False)
        assert [p for p, _ in server.requests[requests:]] == ["manifest.json", "manifest.json.sig"]
    (served / "manifest.json.sig").unlink()
    with pytest.raises(ManifestError, match="no manifest.json.sig"):
        fetch_model(str(served), tmp_path / "unsigned", pubkey=pub, tty=False)


def test_a_signed_only_worker_refuses_an_unsigned_cache_entry(tiny_export: Path, tmp_path: Path) -> None:
    served, pub = _signed_mirror(tiny_export, tmp_path)
    cache = tmp_path / "cache"
    # Filled by hand without the key (the bypass): a worker with the key must not load it.
    fetch_model(str(tiny_export), cache, tty=False)
    with pytest.raises(ManifestError, match="no manifest.json.sig"):
        resolve("random-tiny", fetch=ModelFetch(cache, str(tiny_export), None, pub))
    # Signed by another key: refused as well.
    _, other = _signed_mirror(tiny_export, tmp_path / "other")
    signed_cache = tmp_path / "signed"
    fetch_model(str(served), signed_cache, pubkey=pub, tty=False)
    with pytest.raises(ManifestError, match="does not verify"):
        resolve("random-tiny", fetch=ModelFetch(signed_cache, str(served), None, other))
    assert resolve("random-tiny", fetch=ModelFetch(signed_cache, str(served), None, pub)).random


def test_cli_fetch_takes_source_revision_and_key_from_the_settings(tiny_export: Path, tmp_path: Path) -> None:
    served, pub = _signed_mirror(tiny_export, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env.update({"TTSPOOL_CACHE_DIR": str(tmp_path / "cache"), "TTSPOOL_MODEL_SOURCE": str(served),
                "TTSPOOL_MODEL_PUBKEY": str(pub)})
    out = _finish(_cli("fetch", env=env))
    assert out.strip().splitlines()[-1] == str(model_dir(tmp_path / "cache", "random-tiny", None))
    (served / "manifest.json.sig").unlink()
    env["TTSPOOL_CACHE_DIR"] = str(tmp_path / "cache2")
    refused = subprocess.run([sys.executable, "-m", "tasks.cli", "model", "fetch"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no manifest.json.sig" in refused.stderr
    assert not list((tmp_path / "cache2").rglob("*.safetensors"))


@pytest.mark.parametrize("path, error", [
    ("../escape.safetensors", "bad file path"),
    ("asset/model.pt", "pickle checkpoints execute code"),
    (".complete.json", "bad file path"),
])
def test_manifest_paths_are_checked(path: str, error: str) -> None:
    raw = json.dumps({"model": "m", "files": {path: {"sha256": "a" * 64, "size": 1}}}).encode()
    with pytest.raises(ManifestError, match=error):
        parse_manifest(raw)


def test_chattts_name_needs_the_official_digests(tiny_export: Path, tmp_path: Path) -> None:
    served = mirror_copy(tiny_export, tmp_path / "mirror")
    doc = json.loads((served / "manifest.json").read_text())
    (served / "manifest.json").unlink()
    (served / "manifest.json").write_text(json.dumps({**doc, "model": "chattts"}))
    with pytest.raises(ManifestError, match="differ from ChatTTS' sha256 map"):
        fetch_model(str(served), tmp_path / "cache", tty=False)


def test_cli_list_and_prune(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    target = fetch_model(str(tiny_export), cache, tty=False)
    assert main(["model", "list", "--cache-dir", str(cache), "--verify"]) == 0
    assert re.search(r"random-tiny\s+main\s+219\.\d MiB\s+verified", capsys.readouterr().out)
    config = target / "asset/gpt/config.json"
    data = config.read_bytes()
    config.unlink()
    config.write_bytes(b" " + data[1:])  # same size: only a hash finds it
    assert [m.state for m in list_models(cache)] == ["verified"]
    assert [m.state for m in list_models(cache, verify=True)] == ["corrupt"]
    config.unlink()
    assert [m.state for m in list_models(cache)] == ["incomplete"]
    assert main(["model", "prune", "--older-than", "1h", "--cache-dir", str(cache)]) == 0
    assert target.is_dir()
    old = time.time() - 8 * 86400
    for name in (".last_used", ".complete.json"):
        os.utime(target / name, (old, old))
    assert [m.path for m in prune(cache, 7 * 86400, dry_run=True)] == [target]
    assert main(["model", "prune", "--older-than", "7d", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert not target.exists() and "removed random-tiny main " in out and str(target) in out and "freed " in out
    assert main(["model", "prune", "--older-than", "7 days"]) == 2


def test_cli_export_random_writes_a_mirror(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert main(["model", "export-random", "--model", "random-tiny", str(out)]) == 0
    manifest = parse_manifest((out / "manifest.json").read_bytes())
    assert manifest.model == "random-tiny" and "asset/gpt/model.safetensors" in manifest.files
    assert all(sha256_file(out / rel) == e.sha256 for rel, e in manifest.files.items())
    assert main(["model", "export-random", "--model", "random-tiny", str(out)]) == 2


def test_engine_loads_a_model_fetched_on_first_use(mirror: RangeServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.engine.engine import Engine
    from workers.engine.requests import SynthRequest

    monkeypatch.setenv("TTSPOOL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TTSPOOL_MODEL_SOURCE", mirror.url)
    engine = Engine("random-tiny", device="cpu").load()
    assert engine.assets is not None and engine.assets.root == model_dir(tmp_path, "random-tiny", None)
    assert engine.assets.random and engine.assets.overrides["gpt"]["hidden_size"] == 64
    [out] = engine.generate([SynthRequest(text=engine.normalize("hello"), max_tokens=8)])
    assert out.error is None and out.audio is not None and out.audio.size > 0
    # A worker restart finds the cache complete and asks the mirror nothing.
    hits = len(mirror.requests)
    assert resolve("random-tiny").root == engine.assets.root
    assert len(mirror.requests) == hits


def test_hf_source_goes_through_huggingface_hub_and_checks_the_official_digests(
        tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A local stand-in for the Hub (HF_ENDPOINT) serving random weights under the official
    # names: huggingface_hub downloads them, the official sha256 map refuses them.
    hub = tmp_path / "hub"
    mirror_copy(tiny_export / "asset", hub / "2Noise/ChatTTS/resolve/main/asset")
    with RangeServer(hub) as server:
        server.headers["X-Repo-Commit"] = "a" * 40
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(RuntimeError, match=r"asset/DVAE\.safetensors from hf:2Noise/ChatTTS@main: "
                                               r"sha256 mismatch on all 2 attempts \(expected 1d0b044a"):
            fetch_model("hf", tmp_path / "cache", attempts=2, tty=False)
        assert server.hits("2Noise/ChatTTS/resolve/main/asset/DVAE.safetensors") >= 2
    assert not (tmp_path / "cache/models/chattts/main/asset/DVAE.safetensors").exists()


def test_a_worker_serves_the_bytes_it_fetched_on_its_metrics(
        tiny_export: Path, tmp_path: Path, redis_server: LocalRedis) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env.update({"TTSPOOL_BROKER_URL": redis_server.url, "TTSPOOL_STORAGE_URL": (tmp_path / "out").as_uri(),
                "TTSPOOL_MODEL": "random-tiny", "TTSPOOL_MODEL_SOURCE": str(tiny_export), "TTSPOOL_DEVICE": "cpu",
                "TTSPOOL_CACHE_DIR": str(tmp_path / "cache"), "TTSPOOL_METRICS_PORT": str(port),
                "TTSPOOL_METRICS_ADDR": "127.0.0.1"})
    proc = start_worker(env, tmp_path / "worker.log")
    try:
        wait_for(lambda: fetch(f"http://127.0.0.1:{port}/healthz")[0] == 200, "the worker to load its model",
                 timeout=300)
        fetched = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_model_fetch_bytes_total",
                        source="local")
    finally:
        stop_process(proc)
    total = sum(p.stat().st_size for p in tiny_export.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert fetched == total

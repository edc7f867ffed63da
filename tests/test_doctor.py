"""`ttspool doctor` against real parts: each fault is injected for real and must come back
as the right failing line (with its fix), and the exit status must follow."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from tasks.cli.local_redis import LocalRedis, free_port
from workers.engine.dtypes import cpu_has_native_bf16

from .conftest import S3Endpoint, run_cli


def doctor_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env.update({"TTSPOOL_STORAGE_URL": (tmp_path / "out").as_uri(), "TTSPOOL_CACHE_DIR": str(tmp_path / "cache"),
                "TTSPOOL_MODEL": "random-tiny", "TTSPOOL_DEVICE": "cpu"})
    env.update(extra)
    return env


def doctor(env: dict[str, str], only: str) -> tuple[int, dict[str, dict[str, Any]]]:
    proc = run_cli(env, "doctor", "--json", "--only", only)
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0), proc.stdout + proc.stderr
    return proc.returncode, {c["name"]: c for c in report["checks"]}


def test_a_healthy_machine_passes_every_check(tmp_path: Path, s3: S3Endpoint, aws_env: dict[str, str]) -> None:
    (tmp_path / "redis").mkdir()
    with LocalRedis(data_dir=tmp_path / "redis", persist=True) as redis:
        env = doctor_env(tmp_path, TTSPOOL_BROKER_URL=redis.url, TTSPOOL_STORAGE_URL=f"s3://{s3.bucket}/doctor",
                         TTSPOOL_S3_ENDPOINT_URL=s3.url, **aws_env)
        rc, checks = doctor(env, "python,packages,imports,devices,broker,storage,model,settings")
    assert rc == 0, checks
    assert checks["packages"]["status"] == "ok" and "match uv.lock" in checks["packages"]["detail"]
    assert checks["imports"]["status"] == "ok" and "torchaudio 2.11.0" in checks["imports"]["detail"]
    auto = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert f"engine runs on cpu in {auto} (auto: " in checks["devices"]["detail"]
    assert checks["broker"]["status"] == "ok" and "persistence AOF" in checks["broker"]["detail"]
    assert checks["storage"]["status"] == "ok"
    # The probe object is gone again.
    assert s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="doctor/").get("KeyCount", 0) == 0
    assert checks["model"]["status"] == "ok"


def test_text_output_is_one_line_per_check_with_its_fix(tmp_path: Path) -> None:
    env = doctor_env(tmp_path, TTSPOOL_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    proc = run_cli(env, "doctor", "--only", "python,broker,storage")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "python"], ["fail", "broker"], ["ok", "storage"]]
    assert "-- fix: run `ttspool up`" in lines[1]


def test_a_stopped_redis_fails_the_broker_line(tmp_path: Path) -> None:
    redis = LocalRedis().start()
    url = redis.url
    redis.close()
    rc, checks = doctor(doctor_env(tmp_path, TTSPOOL_BROKER_URL=url), "broker")
    assert rc == 1
    assert checks["broker"]["status"] == "fail" and "unreachable" in checks["broker"]["detail"]
    assert url.removesuffix("/0") in checks["broker"]["detail"]


def test_redis_without_persistence_warns(tmp_path: Path, redis_server: LocalRedis) -> None:
    rc, checks = doctor(doctor_env(tmp_path, TTSPOOL_BROKER_URL=redis_server.url), "broker")
    assert rc == 0
    assert checks["broker"]["status"] == "warn" and "AOF and RDB both off" in checks["broker"]["detail"]


def test_an_unwritable_bucket_fails_the_storage_line(tmp_path: Path, s3: S3Endpoint, aws_env: dict[str, str]) -> None:
    bucket = "doctor-readonly"
    s3.client().create_bucket(Bucket=bucket)
    s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    env = doctor_env(tmp_path, TTSPOOL_STORAGE_URL=f"s3://{bucket}/out", TTSPOOL_S3_ENDPOINT_URL=s3.url, **aws_env)
    rc, checks = doctor(env, "storage")
    assert rc == 1
    assert checks["storage"]["status"] == "fail"
    assert "s3://doctor-readonly/out/ttspool-probe-" in checks["storage"]["detail"]
    assert "PutObject" in checks["storage"]["fix"]
    missing = doctor_env(tmp_path, TTSPOOL_STORAGE_URL="s3://doctor-no-such-bucket", TTSPOOL_S3_ENDPOINT_URL=s3.url,
                         **aws_env)
    rc, checks = doctor(missing, "storage")
    assert rc == 1 and "NoSuchBucket" in checks["storage"]["detail"]


@pytest.mark.parametrize("url, fix", [
    ("/data/out", "TTSPOOL_STORAGE_URL=file:///data/out"),
    ("file://out2", "file:///abs/dir"),
])
def test_a_folder_that_is_not_a_file_url_gets_folder_advice(tmp_path: Path, url: str, fix: str) -> None:
    rc, checks = doctor(doctor_env(tmp_path, TTSPOOL_STORAGE_URL=url), "storage")
    assert rc == 1 and checks["storage"]["status"] == "fail"
    assert fix in checks["storage"]["fix"] and "bucket" not in checks["storage"]["fix"]


def test_storage_without_credentials_names_them(tmp_path: Path, s3: S3Endpoint) -> None:
    env = {k: v for k, v in doctor_env(tmp_path).items() if not k.startswith("AWS_")}
    env.update(TTSPOOL_STORAGE_URL=f"s3://{s3.bucket}/doctor", TTSPOOL_S3_ENDPOINT_URL=s3.url,
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_DEFAULT_REGION="us-east-1")
    rc, checks = doctor(env, "storage")
    assert rc == 1 and "NoCredentialsError" in checks["storage"]["detail"]
    assert "AWS_ACCESS_KEY_ID" in checks["storage"]["fix"]


def test_a_lexicon_the_worker_cannot_read_fails_the_settings_line(tmp_path: Path) -> None:
    rc, checks = doctor(doctor_env(tmp_path, TTSPOOL_LEXICON=str(tmp_path / "nope")), "settings")
    assert rc == 1 and checks["settings"]["status"] == "fail"
    assert "TTSPOOL_LEXICON: cannot read" in checks["settings"]["detail"]
    assert "TTSPOOL_LEXICON" in checks["settings"]["fix"]


def test_a_corrupted_cache_file_fails_the_model_line(tmp_path: Path) -> None:
    env = doctor_env(tmp_path)
    mirror = tmp_path / "mirror"
    assert run_cli(env, "model", "export-random", "--model", "random-tiny", str(mirror)).returncode == 0
    env["TTSPOOL_MODEL_SOURCE"] = str(mirror)
    fetched = run_cli(env, "model", "fetch", "--source", str(mirror), "--model", "random-tiny")
    assert fetched.returncode == 0, fetched.stderr
    rc, checks = doctor(env, "model")
    assert rc == 0 and checks["model"]["status"] == "ok", checks
    # Same size, one byte different: only a hash notices.
    victim = Path(fetched.stdout.strip()) / "asset" / "Decoder.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    rc, checks = doctor(env, "model")
    assert rc == 1
    assert checks["model"]["status"] == "fail"
    assert "failing sha256: asset/Decoder.safetensors" in checks["model"]["detail"]
    assert checks["model"]["fix"].startswith(f"ttspool model fetch --source {mirror}")


def test_int8_weights_are_named_and_refused_where_they_cannot_run(tmp_path: Path) -> None:
    rc, checks = doctor(doctor_env(tmp_path, TTSPOOL_QUANT="int8", TTSPOOL_DTYPE="bfloat16"), "devices")
    assert checks["devices"]["status"] != "fail" and "GPT weights int8 (TTSPOOL_QUANT)" in checks["devices"]["detail"]
    rc, checks = doctor(doctor_env(tmp_path, TTSPOOL_QUANT="int8", TTSPOOL_DTYPE="float32"), "devices")
    assert rc == 1 and checks["devices"]["status"] == "fail"
    assert "runs on the CPU in bfloat16 only" in checks["devices"]["fix"]


def test_settings_that_contradict_each_other_fail(tmp_path: Path) -> None:
    env = doctor_env(tmp_path, TTSPOOL_VISIBILITY_TIMEOUT="300", TTSPOOL_UPLOAD_RETRY_S="60")
    rc, checks = doctor(env, "settings")
    assert rc == 1
    assert "TTSPOOL_VISIBILITY_TIMEOUT=300 s is shorter" in checks["settings"]["detail"]


@pytest.mark.parametrize("damage", ["not-elf", "truncated"])
def test_a_broken_native_library_names_the_package_and_version_pair(tmp_path: Path, damage: str) -> None:
    # The failure a registry release caused: torchaudio's compiled library does not load.
    # A copy of the real package with its library damaged shadows the installed one: not
    # a library at all (dlopen refuses it: OSError), or cut short (the loader crashes).
    import torchaudio

    shadow = tmp_path / "shadow"
    shutil.copytree(Path(torchaudio.__file__).parent, shadow / "torchaudio")
    for lib in (shadow / "torchaudio" / "lib").glob("libtorchaudio*.so"):
        lib.write_bytes(b"not a shared object" if damage == "not-elf" else lib.read_bytes()[:4096])
    env = doctor_env(tmp_path, PYTHONPATH=str(shadow))
    proc = run_cli(env, "doctor", "--only", "imports")
    assert proc.returncode == 1
    [line] = proc.stdout.splitlines()
    if damage == "not-elf":
        assert line.startswith("fail  imports       torchaudio 2.11.0 next to torch 2.11.0 does not import: OSError")
    else:
        assert line.startswith("fail  imports       the interpreter died importing torchaudio (torch 2.11.0)")
        assert "killed by SIG" in line
    assert "-- fix: bash deploy/bootstrap.sh worker" in line


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("hub_env", ["closed-port", "offline"])
def test_an_unreachable_hub_is_one_line_naming_the_ways_on(tmp_path: Path, hub_env: str) -> None:
    env = doctor_env(tmp_path, TTSPOOL_MODEL="chattts")
    env.pop("HF_HUB_OFFLINE", None)
    if hub_env == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    proc = run_cli(env, "run", "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ttspool: error:")]
    assert "is unreachable" in errors[0]
    for way in ("--model random-tiny", "TTSPOOL_MODEL_DIR=", "TTSPOOL_MODEL_SOURCE="):
        assert way in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_packages_that_drifted_from_the_lock_fail_naming_each(tmp_path: Path) -> None:
    # A lock that pins another torchaudio than the one installed: what a venv built
    # before a lock change (or by hand) looks like to the check.
    from tasks.cli.doctor import LOCK, check_packages

    text = LOCK.read_text()
    marker = 'name = "torchaudio"\nversion = "'
    start = text.index(marker) + len(marker)
    installed = text[start:text.index('"', start)]
    lock = tmp_path / "uv.lock"
    lock.write_text(text[:start] + "9.9.9" + text[start + len(installed):])
    check = check_packages(lock)
    assert check.status == "fail"
    assert check.detail == f"not the locked versions: torchaudio {installed} (lock: 9.9.9)"
    assert check_packages(LOCK).status == "ok"


def test_an_unsigned_cache_entry_fails_where_workers_require_a_signature(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    env = doctor_env(tmp_path)
    mirror = tmp_path / "mirror"
    assert run_cli(env, "model", "export-random", "--model", "random-tiny", str(mirror)).returncode == 0
    env["TTSPOOL_MODEL_SOURCE"] = str(mirror)
    assert run_cli(env, "model", "fetch").returncode == 0  # unsigned: no key configured yet
    pub = tmp_path / "pub.pem"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM,
                                                                             PublicFormat.SubjectPublicKeyInfo))
    env["TTSPOOL_MODEL_PUBKEY"] = str(pub)
    rc, checks = doctor(env, "model")
    assert rc == 1 and "no manifest.json.sig" in checks["model"]["detail"]
    assert "will not load it" in checks["model"]["detail"]

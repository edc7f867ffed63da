"""Security: no pickle anywhere, secrets never leak, TLS + ACL brokers and S3 SSE work.

The TLS broker is a real redis-server with only a TLS port, a throwaway CA and server
certificate made here, and an ACL user whose password is the recognizable FAKE_SECRET;
the worker's AWS secret key is FAKE_SECRET too (conftest.aws_env). The secret must
never show up in the worker's log, its /metrics, job errors or CLI output.
"""

from __future__ import annotations

import ast
import datetime
import ipaddress
import os
import pickle
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tasks.cli.local_redis import free_port
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, Settings

from .conftest import FAKE_SECRET, ROOT, S3Endpoint, WorkerProc, raw_message, running_worker, worker_env

PACKAGES = ("tasks", "scheduler", "workers", "storage")


# ---------------------------------------------------------------- no pickle

def test_no_pickle_in_the_code() -> None:
    """No module of ttspool imports pickle-like loaders or asks anyone for pickle."""
    loaders = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "jsonpickle"}
    found = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module.split(".")[0]]
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in (
                        "pickle", "application/x-python-serialize"):
                    names = [node.value]
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                        getattr(node.func, "value", None) is not None and getattr(node.func.value, "id", "") == "torch":
                    # torch.load unpickles unless weights_only=True
                    if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords):
                        names = ["torch.load"]
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n in loaders | {
                    "application/x-python-serialize", "torch.load"}]
    assert not found, found


class _Exploit:
    """Unpickling this runs os.mkdir(marker): proof that nothing unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


def test_pickle_payloads_are_never_loaded(worker: WorkerProc, client: Client, redis_server, tmp_path: Path) -> None:
    # Worker side: a pickle-serialized task message whose unpickling would run code.
    marker = tmp_path / "worker-unpickled"
    job_id = "pickle-" + uuid.uuid4().hex
    body = pickle.dumps(((), {"text": "hi", "x": _Exploit(marker)}, {}))
    r = redis.Redis.from_url(redis_server.url)
    r.lpush(QUEUE_BULK, raw_message(job_id, body, "application/x-python-serialize"))
    st = client.wait([job_id], timeout=120)[0]
    assert st.status == "FAILURE" and "JSON" in (st.error or "") and not marker.exists()
    # Producer side: a result record planted as pickle is refused, not loaded.
    planted = tmp_path / "client-unpickled"
    r.set(f"celery-task-meta-{job_id}", pickle.dumps({"status": "SUCCESS", "result": _Exploit(planted)}))
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        client.status(job_id)
    assert not planted.exists()


# ---------------------------------------------------------------- TLS + ACL broker

@pytest.fixture()
def tls_acl_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server with TLS only and an ACL user; yields the worker's broker URL."""
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ttspool test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM), "srv.pem": srv.public_bytes(serialization.Encoding.PEM),
             "srv.key": srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    port = free_port()
    exe = shutil.which("redis-server")
    assert exe is not None
    proc = subprocess.Popen(
        [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--tls-cert-file", str(tmp_path / "srv.pem"), "--tls-key-file", str(tmp_path / "srv.key"),
         "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
         "--user", "default", "off", "--user", "ttspool", "on", f">{FAKE_SECRET}", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://ttspool:{FAKE_SECRET}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tmp_path / 'ca.pem'}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server with TLS did not start (built without TLS?)"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_tls_acl_broker_and_s3_sse_end_to_end_without_leaking_secrets(
        tls_acl_redis: str, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    metrics_port = free_port()
    env = worker_env(tls_acl_redis, s3, aws_env, TTSPOOL_S3_SSE="AES256", TTSPOOL_METRICS_PORT=str(metrics_port),
                     TTSPOOL_METRICS_ADDR="127.0.0.1")
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        ok = client.wait([client.submit({"text": "Over TLS, as an ACL user, encrypted at rest."})], timeout=120)[0]
        assert ok.status == "SUCCESS" and ok.url is not None
        bucket, key = ok.url.removeprefix("s3://").split("/", 1)
        assert s3.client().head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"
        # Failures, through the CLI, on the same TLS broker.
        bad = client.app.send_task("ttspool.synthesize", kwargs={"text": "hi", "speed": 99}, queue=QUEUE_BULK)
        failed = client.wait([bad.id], timeout=120)[0]
        assert failed.status == "FAILURE"
        status = _cli(env, "status", ok.id, "--json")
        assert status.returncode == 0 and ok.url in status.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert "ttspool_jobs_total" in metrics
    wrong = dict(env, TTSPOOL_BROKER_URL=tls_acl_redis.replace(FAKE_SECRET, FAKE_SECRET + "-wrong"))
    refused = _cli(wrong, "submit", "Wrong password.")
    assert refused.returncode != 0
    outputs = {"worker log": log.read_text(), "metrics": metrics, "job error": failed.error or "",
               "cli status": status.stdout + status.stderr, "cli refused": refused.stdout + refused.stderr}
    for where, text in outputs.items():
        assert FAKE_SECRET not in text, f"secret leaked into the {where}"
    assert proc.returncode == 0


def test_session_worker_log_holds_no_secret(worker: WorkerProc) -> None:
    # The shared worker ran with FAKE_SECRET as its AWS secret key through every other test.
    assert FAKE_SECRET not in worker.log_text()


def test_rediss_url_without_certificate_checking_is_refused(s3: S3Endpoint, aws_env) -> None:
    env = worker_env("rediss://127.0.0.1:1/0", s3, aws_env)
    out = _cli(env, "submit", "Insecure TLS.")
    assert out.returncode == 2 and "ssl_cert_reqs" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_settings_and_errors_redact_passwords() -> None:
    with pytest.raises(ValueError) as info:
        Settings(broker_url=f"http://user:{FAKE_SECRET}@host/0").override(model="random-tiny")
    assert FAKE_SECRET not in str(info.value) and "***" in str(info.value)

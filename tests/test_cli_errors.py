"""What a user sees when something is wrong: one line on stderr, `ttspool: error: ...`,
and the exit status of the error's kind (1 failure, 2 bad input or settings, 3 timeout,
4 no such job)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from storage import StorageError
from tasks.errors import SettingsError, TtspoolError, UsageError
from tasks.schema import JobValidationError
from tasks.cli.local_redis import LocalRedis
from tests.conftest import ROOT, run_cli
from tests.test_doctor import closed_port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    return env | extra


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttspool: error: "), stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args", [("status", "some-job"), ("submit", "Hello.")])
def test_a_broker_that_is_down_is_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    proc = run_cli(_env(TTSPOOL_BROKER_URL=url, TTSPOOL_STORAGE_URL=tmp_path.as_uri()), *args, timeout=120)
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert url in line and "Connection refused" in line
    assert "start Redis there" in line and "TTSPOOL_BROKER_URL (or --broker-url)" in line


class HangUp:
    """A loopback port that accepts each connection and closes it at once, counting them:
    a 'Redis' that is never reached, and a witness of how often a client tries."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        # A close alone leaves accept() blocked in its thread; a shutdown wakes it (Linux).
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


@pytest.fixture()
def hang_up() -> Iterator[HangUp]:
    server = HangUp()
    yield server
    server.close()


@pytest.mark.parametrize("args", [("status", "some-job"), ("submit", "Hello."), ("submit-file", "jobs.jsonl")])
def test_a_broker_never_reached_is_tried_once(args: tuple[str, ...], hang_up: HangUp, tmp_path: Path) -> None:
    """A Redis this process never reached is a setup to fix: one connection, no retries
    (a Redis lost after it answered is ridden out: tests/test_faults_broker.py)."""
    (tmp_path / "jobs.jsonl").write_text('{"text": "Hello."}\n')
    env = _env(TTSPOOL_BROKER_URL=hang_up.url, TTSPOOL_STORAGE_URL=tmp_path.as_uri())
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert hang_up.url in line and "TTSPOOL_BROKER_URL" in line
    assert hang_up.accepted == 1


def test_an_id_nobody_submitted_is_unknown(own_broker: LocalRedis, tmp_path: Path) -> None:
    env = _env(TTSPOOL_BROKER_URL=own_broker.url, TTSPOOL_STORAGE_URL=tmp_path.as_uri())
    proc = run_cli(env, "status", "nonexistent-123")
    assert proc.returncode == 4 and proc.stdout == ""
    assert "no job 'nonexistent-123'" in _one_line(proc.stderr)
    # A job that was submitted is known while it waits (no worker here: it stays queued).
    job_id = run_cli(env, "submit", "Hello.").stdout.strip()
    proc = run_cli(env, "status", job_id)
    assert proc.returncode == 0 and proc.stdout.split() == [job_id, "PENDING"]
    help_text = run_cli(env, "status", "--help").stdout
    assert "4 when no job has the id" in " ".join(help_text.split())


def test_a_wait_that_times_out_names_the_job(own_broker: LocalRedis, tmp_path: Path) -> None:
    env = _env(TTSPOOL_BROKER_URL=own_broker.url, TTSPOOL_STORAGE_URL=tmp_path.as_uri())
    proc = run_cli(env, "submit", "Hello.", "--wait", "--timeout", "0.5")
    assert proc.returncode == 3
    job_id, status = proc.stdout.split()
    assert status == "PENDING"
    line = proc.stderr.strip()
    assert line.startswith(f"ttspool: timeout: job {job_id} not finished") and f"ttspool status {job_id}" in line
    (tmp_path / "jobs.jsonl").write_text('{"text": "One."}\n{"text": "Two."}\n')
    proc = run_cli(env, "submit-file", str(tmp_path / "jobs.jsonl"), "--wait", "--timeout", "0.5", "--json")
    assert proc.returncode == 3
    rows = [json.loads(row) for row in proc.stdout.splitlines()]
    assert [(r["line"], r["status"]) for r in rows] == [(1, "PENDING"), (2, "PENDING")] and all(r["id"] for r in rows)
    assert "2 job(s) not finished" in proc.stderr.strip().splitlines()[-1]


def test_a_bad_setting_is_one_line_and_exit_2() -> None:
    proc = run_cli(_env(TTSPOOL_MAX_BATCH="lots"), "status", "x")
    assert proc.returncode == 2
    assert _one_line(proc.stderr) == "ttspool: error: TTSPOOL_MAX_BATCH must be an integer, got 'lots'"


def test_one_error_family() -> None:
    from storage.models.fetch_http import FetchError
    from storage.models.manifest import ManifestError
    from workers.engine.engine_error import EngineError

    for err in (StorageError, FetchError, ManifestError, EngineError, JobValidationError, SettingsError):
        assert issubclass(err, TtspoolError), err
    # Bad input exits 2 and stays a ValueError for callers that catch that.
    for err in (ManifestError, JobValidationError, SettingsError):
        assert issubclass(err, UsageError) and issubclass(err, ValueError) and err.exit_code == 2

"""Day two, as a user meets it after the README's two commands: `ttspool up` (its own Redis,
a worker and the gateway, stopped together), the demo's stop when the model source is
unreachable, and a gateway-only install that answers every speech format without numpy.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import redis

from tasks.cli.local_redis import LocalRedis, port_is_free

from .conftest import ROOT, run_cli
from .test_doctor import closed_port

UV = ROOT / ".tools" / "uv-0.13.8" / "bin" / "uv"
SPEECH_FORMATS = ("wav", "pcm", "mp3", "opus", "aac", "flac")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell: none of the suite's TTSPOOL_* variables, its own model cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env.update({"TTSPOOL_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_demo_stops_at_once_when_the_model_source_is_unreachable(tmp_path: Path) -> None:
    env = clean_env(tmp_path, TTSPOOL_MODEL_SOURCE=f"http://127.0.0.1:{closed_port()}/models")
    proc = run_cli(env, "run", "--model", "random-tiny", "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("ttspool: error: the model source http://127.0.0.1:") and "is unreachable" in line
    for way in ("--model random-tiny", "TTSPOOL_MODEL_DIR=", "TTSPOOL_MODEL_SOURCE="):
        assert way in line
    # Stopped before anything was started: no Redis, no worker, no progress bar.
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


class Up:
    """`ttspool up` as a subprocess, its output read line by line."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "up", *args], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        out = self.proc.stdout
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(out.readline, "")), daemon=True)
        self._reader.start()

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line.rstrip("\n")
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line starting {prefix!r}; output: {''.join(self.lines)}")

    def pids(self, timeout: float) -> dict[str, int]:
        """{name: pid} from `ttspool up: running (redis N, gateway N, worker N)`, once ready."""
        running = self.wait_for("ttspool up: running (", timeout)
        return {name: int(pid) for name, pid in
                (part.split() for part in running.split("(", 1)[1].split(")", 1)[0].split(", "))}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)


@pytest.fixture()
def unrelated_redis() -> Iterator[redis.Redis | None]:
    """A Redis on the default port that is none of ttspool's (when the port is free here)."""
    if not port_is_free(6379):
        yield None
        return
    with LocalRedis(port=6379) as server:
        client = redis.Redis(port=server.port)
        client.set("someone-else", "1")
        yield client
        client.close()


@pytest.mark.timeout(600)
def test_up_serves_a_job_then_stops_every_child_on_sigint(tmp_path: Path, unrelated_redis: redis.Redis | None) -> None:
    gateway_port = closed_port()
    up = Up(clean_env(tmp_path), tmp_path, "--model", "random-tiny", "--device", "cpu", "--port", str(gateway_port))
    pids: dict[str, int] = {}
    try:
        pids = up.pids(400)
        assert set(pids) == {"redis", "gateway", "worker"}
        export = up.wait_for("export ", 30)
        exported = dict(item.split("=", 1) for item in shlex.split(export.removeprefix("export ")))
        assert set(exported) == {"TTSPOOL_BROKER_URL", "TTSPOOL_STORAGE_URL", "TTSPOOL_MODEL"}
        assert exported["TTSPOOL_MODEL"] == "random-tiny"
        # Its own Redis on a port of its own, never the default one (where another Redis runs).
        broker = exported["TTSPOOL_BROKER_URL"]
        assert broker.startswith("redis://127.0.0.1:") and not broker.startswith("redis://127.0.0.1:6379/")
        assert f":{broker.split(':')[2].split('/')[0]}" in Path(f"/proc/{pids['redis']}/cmdline").read_text()
        assert exported["TTSPOOL_STORAGE_URL"] == (tmp_path / "out").resolve().as_uri()
        for name in ("gateway", "page", "docs", "metrics"):
            assert up.wait_for(f"  {name} ", 5)

        # A second `up` while this one runs starts nothing and prints the same lines.
        again = run_cli(clean_env(tmp_path), "up", "--model", "random-tiny", timeout=60)
        assert again.returncode == 0 and "already running" in again.stdout and export in again.stdout

        # Every later command, with the printed line and nothing else.
        submitted = run_cli(clean_env(tmp_path / "elsewhere", **exported), "submit", "Hello there.", "--wait",
                            "--json", timeout=120)
        assert submitted.returncode == 0, submitted.stderr
        status = json.loads(submitted.stdout)
        assert status["status"] == "SUCCESS"
        assert Path(status["url"].removeprefix("file://")).is_file()
        # The README's next line: doctor checks this pool's model, not the default one.
        doctor = run_cli(clean_env(tmp_path / "elsewhere", **exported), "doctor", timeout=120)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/healthz", timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        if unrelated_redis is not None:
            assert unrelated_redis.keys() == [b"someone-else"]
    finally:
        up.stop()
        for pid in pids.values():  # what the test checks below; a leftover is stopped here
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert up.proc.returncode == 0, "".join(up.lines)
    assert "ttspool up: stopping\n" in up.lines
    assert pids and not [name for name, pid in pids.items() if alive(pid)]
    assert not (tmp_path / "cache" / "up" / "up.json").exists()


@pytest.mark.timeout(600)
def test_up_stops_everything_when_its_worker_dies(tmp_path: Path) -> None:
    up = Up(clean_env(tmp_path), tmp_path, "--model", "random-tiny", "--device", "cpu", "--port", str(closed_port()))
    pids: dict[str, int] = {}
    try:
        pids = up.pids(400)
        os.kill(pids["worker"], signal.SIGKILL)
        up.proc.wait(120)
    finally:
        up.stop()
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    output = "".join(up.lines)
    assert up.proc.returncode == 1, output
    assert "ttspool: error: the worker exited with code -9" in output
    assert pids and not [name for name, pid in pids.items() if alive(pid)]


def _uv() -> str | None:
    return str(UV) if UV.is_file() else shutil.which("uv")


GATEWAY_CHECK = """
import importlib.util, io, math, struct, sys
missing = [m for m in ("numpy", "soundfile", "torch") if importlib.util.find_spec(m) is not None]
assert not missing, f"a gateway install must not hold {missing}"
import av
from tasks.gateway.deps import content_type
from tasks.gateway.routes_speech import _assemble
segments = [b"".join(struct.pack("<h", int(8000 * math.sin(i / 9))) for i in range(k * 2400, (k + 1) * 2400))
            for k in range(2)]
for fmt in sys.argv[1:]:
    data = _assemble(segments, fmt)
    if fmt == "pcm":
        assert data == b"".join(segments)
        continue
    with av.open(io.BytesIO(data)) as src:
        stream = src.streams.audio[0]
        seconds = sum(f.samples for f in src.decode(stream)) / stream.rate
    # 0.2 s of audio; encoders add their priming and padding, never lose it.
    assert 0.2 <= seconds < 0.3, (fmt, seconds)
    print(fmt, content_type(fmt), len(data), round(seconds, 3))
assert not [m for m in ("numpy", "soundfile", "torch") if m in sys.modules]
"""


def test_a_gateway_only_install_assembles_every_speech_format_without_numpy(tmp_path: Path) -> None:
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed (deploy/bootstrap.sh installs it into .tools/)")
    venv = tmp_path / "gateway-venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    sync = subprocess.run([uv, "sync", "--locked", "--offline", "--extra", "gateway", "--python", sys.executable,
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if sync.returncode != 0 and "wasn't found in the cache" in sync.stderr:
        pytest.skip("uv's package cache lacks the gateway's packages (offline): " + " ".join(sync.stderr.split())[:300])
    assert sync.returncode == 0, sync.stderr
    check = subprocess.run([str(venv / "bin" / "python"), "-c", GATEWAY_CHECK, *SPEECH_FORMATS], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert [line.split()[0] for line in check.stdout.splitlines()] == [f for f in SPEECH_FORMATS if f != "pcm"]

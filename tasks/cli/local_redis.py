"""A throwaway redis-server on a free loopback port (local runs and tests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import redis

from ..polling import poll


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalRedis:
    def __init__(self, port: int | None = None, data_dir: Path | None = None, persist: bool = False,
                 own_group: bool = False) -> None:
        self.port = port or free_port()
        self.persist = persist
        # Out of the terminal's process group: Ctrl-C reaches the owner, which stops the
        # worker (a warm shutdown, still recording results) before this Redis.
        self.own_group = own_group
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ttspool-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "LocalRedis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        args = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--save", "", "--protected-mode", "yes", "--loglevel", "warning"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     process_group=0 if self.own_group else None)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        proc = self.proc

        def answered() -> bool | None:
            try:
                return client.ping() or None
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}") from None
                return None

        try:
            poll(answered, timeout=timeout, every=0.05,
                 timed_out=lambda: f"redis-server did not answer on port {self.port} within {timeout} s")
        except TimeoutError as err:
            self.stop()
            raise RuntimeError(str(err)) from None
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

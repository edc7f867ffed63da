"""A Redis Sentinel deployment on loopback for the failover tests: a primary and a
replica (both with AOF on) and three sentinels, each a real redis-server process."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tasks.cli.local_redis import LocalRedis, free_port

MASTER = "ttspool-primary"


class SentinelCluster:
    def __init__(self, folder: Path, down_after_ms: int = 1000) -> None:
        self.folder = folder
        self.down_after_ms = down_after_ms
        self.primary = LocalRedis(data_dir=folder / "primary", persist=True)
        self.replica = LocalRedis(data_dir=folder / "replica", persist=True)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def start(self) -> "SentinelCluster":
        for server in (self.primary, self.replica):
            server.data_dir.mkdir(parents=True)
            server.start()
        # Redis 7 waits 5 s for more replicas before a diskless full sync by default.
        redis.Redis(port=self.primary.port).config_set("repl-diskless-sync-delay", 0)
        redis.Redis(port=self.replica.port).replicaof("127.0.0.1", self.primary.port)
        # Synced, not only connected: a replica still waiting for its first sync would be
        # promoted empty.
        self._until(lambda: redis.Redis(port=self.replica.port).info("replication").get("master_link_status") == "up",
                    30, "the replica's first sync")
        exe = shutil.which("redis-server")
        assert exe is not None
        for port in self.sentinel_ports:
            conf = self.folder / f"sentinel-{port}.conf"  # sentinels rewrite their config: one file each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\nloglevel warning\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self.sentinels.append(subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
        # Ready when every sentinel knows the replica and the other two sentinels:
        # before that, a lost primary would not be failed over.
        self._until(lambda: all(self._view(port).get("num-slaves") == 1 and self._view(port).get("num-other-sentinels") == 2
                                for port in self.sentinel_ports), 30, "the sentinels to find each other and the replica")
        return self

    def _view(self, port: int) -> dict:
        client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return client.sentinel_master(MASTER)
        except (redis.RedisError, OSError):
            return {}
        finally:
            client.close()

    def primary_port(self) -> int | None:
        """The primary the sentinels agree on (a majority of them), None while they don't."""
        ports = [int(view["port"]) for view in map(self._view, self.sentinel_ports) if view]
        for port in set(ports):
            if ports.count(port) >= 2:
                return port
        return None

    @staticmethod
    def _until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def kill_primary(self) -> None:
        """SIGKILL, as a crashed host: no shutdown save, no goodbye to the replica."""
        assert self.primary.proc is not None
        self.primary.proc.kill()
        self.primary.proc.wait()
        self.primary.proc = None

    def wait_promoted(self, timeout: float = 60) -> float:
        """Seconds until the sentinels name the replica primary and it takes writes."""
        start = time.monotonic()

        def promoted() -> bool:
            if self.primary_port() != self.replica.port:
                return False
            return redis.Redis(port=self.replica.port).info("replication").get("role") == "master"

        self._until(promoted, timeout, "the replica's promotion")
        return time.monotonic() - start

    def close(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.primary.stop()
        self.replica.stop()

    def __enter__(self) -> "SentinelCluster":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A TCP forwarder on loopback that adds a fixed delay to every round trip, for
`ttspool bench --pipeline` (storage as slow as a remote bucket, on one machine).

Written here because no library injects latency in-process: netem (`tc qdisc`) needs
root and a network namespace, toxiproxy is a separate Go server to download and run.
This is a few dozen lines of sockets, threads and nothing else.

What is delayed: the first client bytes of a connection, and the first client bytes
after the server last sent something, each wait `delay_ms` before they are forwarded.
For HTTP/1.1 (one request at a time on a connection) that is one wait per request (and
one more after a `100 Continue`, as a real network costs a round trip there too), while
a body that arrives in many reads waits once, not once per read: the delay models a
round-trip time, not a bandwidth. Replies are forwarded as they come.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Callable

_CHUNK = 65536


class _Turn:
    """Per connection: has the server spoken since the client last did?"""

    def __init__(self) -> None:
        self.server_spoke = True  # a new connection's first request waits too
        self.pumps_left = 2
        self.lock = threading.Lock()


class DelayProxy:
    def __init__(self, target: tuple[str, int], delay_ms: float = 0.0) -> None:
        self.target = target
        # Read at every turn, so it may be changed while connections are open.
        self.delay_ms = delay_ms
        self.connections = 0
        self.round_trips = 0  # client turns forwarded (each waited delay_ms)
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        # accept() wakes up this often to see close(): closing a listening socket from
        # another thread does not wake a blocked accept() on Linux.
        self._listener.settimeout(0.2)
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "DelayProxy":
        self._spawn(self._accept, "delay-proxy-accept")
        return self

    def alive_threads(self) -> list[threading.Thread]:
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut every connection, and join every thread (bounded)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the pumps blocked in recv()
        for t in threads:
            t.join(timeout)

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()  # the client sees a reset, as from a dead upstream
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self._socks |= {client, upstream}
                self.connections += 1
            turn = _Turn()
            self._spawn(self._pump, "delay-proxy-up", client, upstream, turn, True)
            self._spawn(self._pump, "delay-proxy-down", upstream, client, turn, False)

    def _pump(self, src: socket.socket, dst: socket.socket, turn: _Turn, to_server: bool) -> None:
        try:
            while data := src.recv(_CHUNK):
                if not to_server:
                    # Set before the reply is forwarded: the client cannot answer it sooner.
                    turn.server_spoke = True
                elif turn.server_spoke:
                    turn.server_spoke = False
                    with self._lock:
                        self.round_trips += 1
                    if self.delay_ms > 0 and self._stop.wait(self.delay_ms / 1000):
                        break
                dst.sendall(data)
        except OSError:
            pass  # a reset, or close() cut it
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # pass the end of this direction on
        with turn.lock:
            turn.pumps_left -= 1
            last = turn.pumps_left == 0
        if last:
            with self._lock:
                self._socks -= {src, dst}
            src.close()
            dst.close()

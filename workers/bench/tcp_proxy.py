"""A TCP forwarder on loopback that can slow a connection down or cut it: the storage
delay of `ttspool bench --pipeline` (a remote bucket's round trip, on one machine), and
the network faults of the fault tests (tests/fault_tools.py).

Written here because no library does either in-process: netem (`tc qdisc`) needs root
and a network namespace, toxiproxy is a separate Go server to download and run. This is
a few dozen lines of sockets, threads and nothing else, and imports no torch.

Delay: the first client bytes of a connection, and the first client bytes after the
server last sent something, each wait `delay_ms` before they are forwarded. For HTTP/1.1
(one request at a time on a connection) that is one wait per request (and one more after
a `100 Continue`, as a real network costs a round trip there too), while a body that
arrives in many reads waits once, not once per read: the delay models a round-trip
time, not a bandwidth. Replies are forwarded as they come.

Faults: cut() drops every connection and refuses new ones, as a network partition or a
dead load balancer does (stopping moto itself is no outage: its handler threads keep
serving kept-alive connections), until start() opens the same port again. After
drop_at(match), the next client write (or server reply) that matches is not forwarded:
every connection drops right there, and, with an outage, new ones are refused for a
while.

The accept thread and every connection's two pump threads share the connection set,
the counters, the delay and the one-shot drop, so all of them are read and changed under
one lock: two pumps matching at once drop (and schedule a reopening) once, and close()
cannot miss a connection being set up. close() stops it for good: it joins every thread
it started (bounded) and closes every socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Callable

_CHUNK = 65536
# accept() wakes up this often to see close(): closing a listening socket from another
# thread does not wake a blocked accept() on Linux.
_ACCEPT_POLL_S = 0.2
_CONNECT_TIMEOUT_S = 10.0


class _Turn:
    """Per connection: has the server spoken since the client last did? And is either
    of its two pumps still running (the last one out closes both sockets)?"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server_spoke = True  # a new connection's first request waits too
        self._pumps_left = 2

    def server_speaks(self) -> None:
        with self._lock:
            self._server_spoke = True

    def client_speaks(self) -> bool:
        """True when this starts the client's turn (the server spoke since it last did)."""
        with self._lock:
            starts, self._server_spoke = self._server_spoke, False
            return starts

    def pump_ended(self) -> bool:
        """True for the second of the two pumps to end."""
        with self._lock:
            self._pumps_left -= 1
            return self._pumps_left == 0


class TcpProxy:
    def __init__(self, target: tuple[str, int], delay_ms: float = 0.0) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._delay_ms = delay_ms
        self._connections = 0
        self._round_trips = 0
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._drop_at: Callable[[bytes], bool] | None = None
        self._drop_replies = False
        self._outage_s = 0.0
        self.dropped = threading.Event()
        # Bound now, so that the port is known before start() and kept across cut() and
        # start(): the client under test keeps its one address, as it would a real host's.
        self._listener: socket.socket | None = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        self._accepting = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def delay_ms(self) -> float:
        with self._lock:
            return self._delay_ms

    @delay_ms.setter
    def delay_ms(self, ms: float) -> None:
        # Read at every turn, so it may be changed while connections are open.
        with self._lock:
            self._delay_ms = ms

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def round_trips(self) -> int:
        """Client turns forwarded (each waited delay_ms)."""
        with self._lock:
            return self._round_trips

    def start(self) -> "TcpProxy":
        """Accept connections; after cut(), on the same port again. Does nothing once
        closed, or while it accepts already."""
        with self._lock:
            if self._stop.is_set() or self._accepting:
                return self
            if self._listener is None:
                self._listener = self._listen(self.port)
            self._accepting = True
            self._spawn_locked(self._accept, "tcp-proxy-accept", self._listener)
        return self

    def drop_at(self, match: Callable[[bytes], bool], replies: bool = False, outage_s: float = 0) -> None:
        """Drop at the next client write that matches, or server reply with `replies`;
        with `outage_s`, refuse new connections for that long after."""
        with self._lock:
            self.dropped.clear()
            self._drop_at = match
            self._drop_replies = replies
            self._outage_s = outage_s

    def cut(self) -> None:
        """Drop every connection and refuse new ones until start()."""
        with self._lock:
            listener, self._listener = self._listener, None
            self._accepting = False
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # stops listening now, not at the next poll
            listener.close()
        self._drop_connections()

    def alive_threads(self) -> list[threading.Thread]:
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def close(self, timeout: float = 5.0) -> None:
        """Cut, never reopen (a pending outage's reopening included), and join every
        thread (each within `timeout`)."""
        self._stop.set()
        self.cut()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.create_server(("127.0.0.1", port))
        listener.settimeout(_ACCEPT_POLL_S)
        return listener

    def _spawn_locked(self, target: Callable[..., None], name: str, *args: object) -> None:
        """Start a thread close() will join; the caller holds the lock and has checked
        that close() has not begun."""
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # cut or closed
            self._connect(client, listener)

    def _connect(self, client: socket.socket, listener: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT_S)
        except OSError:
            client.close()  # the client sees a reset, as from a dead upstream
            return
        client.settimeout(None)
        upstream.settimeout(None)
        with self._lock:
            if self._listener is not listener:  # cut or closed while it connected
                client.close()
                upstream.close()
                return
            self._socks |= {client, upstream}
            self._connections += 1
            turn = _Turn()
            self._spawn_locked(self._pump, "tcp-proxy-up", client, upstream, turn, True)
            self._spawn_locked(self._pump, "tcp-proxy-down", upstream, client, turn, False)

    def _pump(self, src: socket.socket, dst: socket.socket, turn: _Turn, to_server: bool) -> None:
        try:
            while data := src.recv(_CHUNK):
                if self._drops(data, to_server):
                    break
                if not to_server:
                    # Set before the reply is forwarded: the client cannot answer it sooner.
                    turn.server_speaks()
                elif turn.client_speaks() and self._stop.wait(self._count_round_trip() / 1000):
                    break
                dst.sendall(data)
        except OSError:
            pass  # a reset, or cut() shut it
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # pass the end of this direction on
        if turn.pump_ended():
            with self._lock:
                self._socks -= {src, dst}
            src.close()
            dst.close()

    def _count_round_trip(self) -> float:
        """Counts a client turn; the milliseconds it waits."""
        with self._lock:
            self._round_trips += 1
            return self._delay_ms

    def _drops(self, data: bytes, to_server: bool) -> bool:
        with self._lock:
            match = self._drop_at
            if match is None or to_server == self._drop_replies or not match(data):
                return False
            self._drop_at = None  # one drop per drop_at()
            self.dropped.set()
            outage = self._outage_s
        if outage:
            self.cut()
            with self._lock:
                if not self._stop.is_set():
                    self._spawn_locked(self._reopen_after, "tcp-proxy-reopen", outage)
        else:
            self._drop_connections()
        return True

    def _reopen_after(self, outage_s: float) -> None:
        if not self._stop.wait(outage_s):
            self.start()

    def _drop_connections(self) -> None:
        # Shut, not closed: each connection's last pump closes its sockets.
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the pumps blocked in recv()

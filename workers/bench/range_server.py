"""A static file server on loopback that honours `Range`, for the fetch tests and benchmark.

It stands in for a mirror or a CDN edge: an optional per-connection bandwidth cap (as
an edge or a long fat pipe imposes) and scripted faults per path, each used up by one
request: "503", "drop" (close mid-body), "stall" (stop sending mid-body), "norange"
(answer 200 with the whole file), "corrupt" (flip a byte of the body).
"""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_BLOCK = 64 * 1024


class RangeServer:
    def __init__(self, root: Path, rate_bps: float | None = None) -> None:
        self.root = root.resolve()
        self.rate_bps = rate_bps
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: list[tuple[str, str | None]] = []
        self.headers: dict[str, str] = {}  # sent with every file (e.g. a Hub's X-Repo-Commit)
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "RangeServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)

    def __enter__(self) -> "RangeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hits(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p == path)

    def take_fault(self, path: str) -> str | None:
        with self.lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None


def _handler_for(server: RangeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET(body=False)

        def do_GET(self, body: bool = True) -> None:
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            with server.lock:
                server.requests.append((rel, self.headers.get("Range")))
            fault = server.take_fault(rel)
            path = (server.root / rel).resolve()
            if fault == "503" or not path.is_file() or server.root not in path.parents:
                self._empty(503 if fault == "503" else 404)
                return
            size = path.stat().st_size
            m = _RANGE.match(self.headers.get("Range", ""))
            start, end, status = 0, size - 1, 200
            if m and fault != "norange":
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
                if start > end:
                    self._empty(416)
                    return
                status = 206
            length = end + 1 - start
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{path.stat().st_mtime_ns:x}-{size:x}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            for name, value in server.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not body:
                return
            with open(path, "rb") as f:
                f.seek(start)
                self._send(rel, f, length // 2 if fault in ("drop", "stall") else length, fault == "corrupt")
            if fault == "stall":
                server.closing.wait(60)
            if fault in ("drop", "stall"):
                self.close_connection = True

        def _empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, rel: str, f: BinaryIO, length: int, corrupt: bool) -> None:
            t0, sent = time.monotonic(), 0
            while sent < length:
                block = bytearray(f.read(min(_BLOCK, length - sent)))
                if corrupt and sent == 0:
                    block[0] ^= 0xFF
                try:
                    self.wfile.write(block)
                except OSError:
                    return
                sent += len(block)
                with server.lock:
                    server.bytes_sent[rel] += len(block)
                if server.rate_bps:
                    # Sleep until this connection is back under its bandwidth cap.
                    ahead = sent / server.rate_bps - (time.monotonic() - t0)
                    if ahead > 0 and server.closing.wait(ahead):
                        return

    return Handler

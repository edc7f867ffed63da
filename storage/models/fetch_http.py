"""Download one file over HTTP(S) into `NAME.partial`: parallel ranged GETs, resumable.

Hand-written on urllib3 because no maintained Python library does the whole job: parallel
ranged GETs for one file, resume after kill -9 from a progress state file, a `Range`
probe with a single-stream fallback, and per-range retries with backoff (requests, httpx
and urllib3 fetch one stream; hf_transfer/hf_xet speak only the Hub's protocol; aria2 is a
binary). Hashing is the caller's job: this module only gets the bytes onto disk.

Resume: the `.partial` file is preallocated and each range writes at its own offset; the
state file (`NAME.partial.json`) records, per range, how many bytes from its start are
on disk. Data is always written before the state claims it, so after a crash a range
restarts at most from slightly before where it stopped, never past a hole.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from tasks.errors import TtspoolError

log = logging.getLogger("ttspool.fetch")

MiB = 1024 * 1024
_RETRY_STATUS = {429, 500, 502, 503, 504}
_STATE_VERSION = 1


class FetchError(TtspoolError, RuntimeError):
    """A download that failed for good (after its retry budget, or on a non-retryable answer)."""


@dataclass(frozen=True)
class HttpPolicy:
    parallel_min: int = 64 * MiB  # files at least this big are fetched in parallel ranges
    max_streams: int = 8
    min_segment: int = 4 * MiB
    attempts: int = 6  # consecutive failed attempts without progress, per range
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    state_every_s: float = 0.5
    chunk: int = 256 * 1024


@dataclass
class _Probe:
    ranges: bool
    size: int | None
    validator: str


class _Retry(Exception):
    """A transient failure (connection, timeout, 429, 5xx): back off and try the range again."""


def state_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def backoff_delay(policy: HttpPolicy, failures: int, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter (0.5x-1.5x), so many nodes do not retry in lockstep."""
    if retry_after is not None:
        return min(policy.backoff_max_s, retry_after)
    return min(policy.backoff_max_s, policy.backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.5)


class HttpDownload:
    def __init__(self, pool: urllib3.PoolManager, url: str, display: str, partial: Path,
                 policy: HttpPolicy, on_bytes: Callable[[int], None]) -> None:
        self._pool, self._url, self._display = pool, url, display
        self._partial, self._policy, self._on_bytes = partial, policy, on_bytes
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._segments: list[list[int]] = []  # [start, end_inclusive, done]
        self._last_save = 0.0
        self._validator = ""
        self.fetched = 0

    def run(self, expected_size: int | None) -> int:
        """Fetch into the partial file; return the bytes fetched by this call."""
        probe = self._with_retries(self._probe)
        if expected_size is not None and probe.size is not None and probe.size != expected_size:
            raise FetchError(f"{self._display}: server has {probe.size} bytes, manifest says {expected_size}")
        size, self._validator = probe.size, probe.validator
        resumable = probe.ranges and size is not None
        if not resumable or not self._resume(size, probe.validator):
            self._start_fresh(size, probe.ranges)
        streams = min(self._policy.max_streams, len(self._segments))
        if streams <= 1:
            self._fetch_segment(0, ranged=resumable)
        else:
            log.debug("%s: %d ranges, %d streams", self._display, len(self._segments), streams)
            with ThreadPoolExecutor(streams, thread_name_prefix="fetch") as ex:
                futures = [ex.submit(self._fetch_segment, i, True) for i in range(len(self._segments))]
                try:
                    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                finally:
                    self._abort.set()
                # The first failure, not the ranges it then cut short.
                for f in done:
                    if (err := f.exception()) is not None:
                        raise err
        state_path(self._partial).unlink(missing_ok=True)
        return self.fetched

    def _request(self, headers: dict[str, str], ok: tuple[int, ...] = (200, 206)) -> urllib3.BaseHTTPResponse:
        # identity: byte offsets must be offsets into the file, not into a compressed stream.
        headers = {**headers, "Accept-Encoding": "identity"}
        try:
            resp = self._pool.request("GET", self._url, headers=headers, preload_content=False,
                                      decode_content=False, redirect=True)
        except (Urllib3Error, OSError) as err:
            raise _Retry(f"connection error: {type(err).__name__}") from None
        if resp.status in _RETRY_STATUS:
            resp.drain_conn()
            after = resp.headers.get("Retry-After", "")
            raise _Retry(f"HTTP {resp.status}", float(after) if after.isdigit() else None)
        if resp.status not in ok:
            resp.drain_conn()
            raise FetchError(f"{self._display}: HTTP {resp.status}")
        return resp

    def _probe(self) -> _Probe:
        # 416: an empty file has no byte 0; fetch it as one plain stream.
        resp = self._request({"Range": "bytes=0-0"}, ok=(200, 206, 416))
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        if resp.status == 206 and total.isdigit():
            resp.drain_conn()
            resp.release_conn()
            return _Probe(True, int(total), validator)
        # Range ignored: the body is the whole file; drop this connection rather than read it.
        resp.close()
        length = resp.headers.get("Content-Length", "")
        log.info("%s: server ignores Range, fetching in one stream", self._display)
        return _Probe(False, int(length) if length.isdigit() else None, validator)

    def _plan(self, size: int | None, ranges: bool) -> list[list[int]]:
        p = self._policy
        if size is None:
            return [[0, -1, 0]]
        if not ranges or size < p.parallel_min:
            return [[0, size - 1, 0]]
        # Several ranges per stream, so a slow connection does not hold the tail alone.
        seg = max(p.min_segment, -(-size // (p.max_streams * 4)))
        return [[s, min(s + seg, size) - 1, 0] for s in range(0, size, seg)]

    def _resume(self, size: int | None, validator: str) -> bool:
        sp = state_path(self._partial)
        try:
            state = json.loads(sp.read_text())
            ok = (state["version"] == _STATE_VERSION and state["size"] == size
                  and state["validator"] == validator and self._partial.stat().st_size == size)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not ok:
            return False
        self._segments = [list(s) for s in state["segments"]]
        have = sum(s[2] for s in self._segments)
        log.info("%s: resuming, %d of %d bytes already on disk", self._display, have, size)
        return True

    def _start_fresh(self, size: int | None, ranges: bool) -> None:
        self._segments = self._plan(size, ranges)
        with open(self._partial, "wb") as f:
            if size is not None:
                f.truncate(size)
        self._save_state(force=True)

    def _save_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < self._policy.state_every_s:
            return
        self._last_save = now
        sp = state_path(self._partial)
        tmp = sp.with_name(sp.name + ".tmp")
        size = self._segments[-1][1] + 1 if self._segments[-1][1] >= 0 else None
        tmp.write_text(json.dumps({"version": _STATE_VERSION, "size": size,
                                   "validator": self._validator, "segments": self._segments}))
        os.replace(tmp, sp)

    def _with_retries(self, fn: Callable[[], _Probe]) -> _Probe:
        failures = 0
        while True:
            try:
                return fn()
            except _Retry as err:
                failures += 1
                self._backoff_or_fail(err, failures)

    def _backoff_or_fail(self, err: _Retry, failures: int) -> None:
        if failures >= self._policy.attempts or self._abort.is_set():
            raise FetchError(f"{self._display}: giving up after {failures} attempts ({err.args[0]})")
        delay = backoff_delay(self._policy, failures, err.args[1] if len(err.args) > 1 else None)
        log.warning("%s: %s, retrying in %.1fs", self._display, err.args[0], delay)
        time.sleep(delay)

    def _fetch_segment(self, i: int, ranged: bool) -> None:
        seg = self._segments[i]
        failures = 0
        while seg[1] < 0 or seg[0] + seg[2] <= seg[1]:
            if self._abort.is_set():
                return
            before = seg[2]
            try:
                if self._stream(seg, ranged):
                    return
                raise _Retry("connection closed before the range ended")
            except _Retry as err:
                failures = 1 if seg[2] > before else failures + 1
                self._backoff_or_fail(err, failures)

    def _stream(self, seg: list[int], ranged: bool) -> bool:
        """Read one response into the segment; True once the segment is complete."""
        if not ranged:
            seg[2] = 0  # no Range support: every attempt starts over
        headers = {"Range": f"bytes={seg[0] + seg[2]}-{seg[1]}"} if ranged else {}
        resp = self._request(headers)
        if ranged and resp.status != 206:
            resp.close()
            raise _Retry("server stopped honouring Range")
        fd = os.open(self._partial, os.O_WRONLY)
        complete = False
        try:
            while not self._abort.is_set():
                want = self._policy.chunk if seg[1] < 0 else min(self._policy.chunk, seg[1] + 1 - seg[0] - seg[2])
                if want <= 0:
                    break
                try:
                    block = resp.read(want)
                except (Urllib3Error, OSError) as err:
                    raise _Retry(f"read error: {type(err).__name__}") from None
                if not block:
                    break
                os.pwrite(fd, block, seg[0] + seg[2])
                with self._lock:
                    seg[2] += len(block)
                    self.fetched += len(block)
                    self._save_state()
                self._on_bytes(len(block))
            complete = not self._abort.is_set() and (seg[1] < 0 or seg[0] + seg[2] > seg[1])
            if complete and seg[1] < 0:
                os.ftruncate(fd, seg[2])
        finally:
            os.close(fd)
            if complete:
                resp.drain_conn()
                resp.release_conn()
            else:
                resp.close()
        with self._lock:
            self._save_state(force=True)
        return complete


def make_pool(policy: HttpPolicy) -> urllib3.PoolManager:
    # Our own retry loop resumes from the bytes already written; urllib3's would restart.
    return urllib3.PoolManager(
        maxsize=policy.max_streams, retries=False,
        timeout=urllib3.Timeout(connect=policy.connect_timeout_s, read=policy.read_timeout_s),
    )


def http_get_small(pool: urllib3.PoolManager, url: str, display: str, policy: HttpPolicy) -> bytes | None:
    """A small whole file (a manifest), with the same retries; None when the server has none (404)."""
    failures = 0
    while True:
        try:
            resp = pool.request("GET", url, preload_content=True)
        except (Urllib3Error, OSError) as err:
            resp, error = None, f"connection error: {type(err).__name__}"
        if resp is not None:
            if resp.status == 404:
                return None
            if resp.status == 200:
                return resp.data
            if resp.status not in _RETRY_STATUS:
                raise FetchError(f"{display}: HTTP {resp.status}")
            error = f"HTTP {resp.status}"
        failures += 1
        if failures >= policy.attempts:
            raise FetchError(f"{display}: giving up after {failures} attempts ({error})")
        time.sleep(backoff_delay(policy, failures))

"""Helpers for the metrics tests: scrape an endpoint, run the real exporter, promtool."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from tasks.cli.local_redis import free_port

from .conftest import ROOT, stop_process

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def wait_for(probe: Callable[[], object], what: str, timeout: float = 60, every: float = 0.2) -> object:
    """Poll until `probe()` returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except OSError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Exporter:
    """`ttspool exporter` as its own process, on a free loopback port."""

    def __init__(self, broker_url: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", "--broker-url", broker_url, "exporter",
                 "--addr", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: self.proc.poll() is not None or fetch(self.url, 2)[0] == 200, "the exporter to listen")
            assert self.proc.poll() is None, log.read_text()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def scrape(self) -> Samples:
        status, text = fetch(self.url)
        assert status == 200, text
        return parse(text)

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: install Debian's prometheus package (deploy/bootstrap.sh does)"
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)


def check_metrics(exposition: str) -> None:
    """`promtool check metrics` must accept the text: exit 0 and no lint findings."""
    res = promtool("check", "metrics", stdin=exposition)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr

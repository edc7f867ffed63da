"""A `ttspool worker` subprocess, for the commands and tests that run their own: started
with exactly the environment they give, waited on until it serves, and stopped by its
pid, on success, error or Ctrl-C alike.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    from ..producer import Client

# A warm shutdown finishes the running batch first: a minute covers a large one on a
# slow CPU, and a worker that takes longer is stuck.
STOP_S = 60.0
_KILLED_S = 10.0
_LOG_TAIL = 3000


def start_cli(args: list[str], env: Mapping[str, str], log: Path | None = None, cwd: Path | None = None,
              own_group: bool = False) -> subprocess.Popen[bytes]:
    """`ttspool ARGS` in a child process, its output appended to `log`, or on this
    process' own when None. `own_group`: a terminal's Ctrl-C reaches only this process,
    which then stops its children in its own order."""
    cmd = [sys.executable, "-m", "tasks.cli", *args]
    group = 0 if own_group else None
    if log is None:
        return subprocess.Popen(cmd, cwd=cwd, env=dict(env), process_group=group)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                process_group=group)


def start_worker(env: Mapping[str, str], log: Path | None = None, loglevel: str = "INFO",
                 cwd: Path | None = None, own_group: bool = False) -> subprocess.Popen[bytes]:
    return start_cli(["worker", "--loglevel", loglevel], env, log, cwd, own_group)


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = STOP_S) -> None:
    """SIGTERM (a warm shutdown), SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_KILLED_S)


@contextmanager
def running_worker(env: Mapping[str, str], log: Path | None = None, loglevel: str = "INFO",
                   cwd: Path | None = None, stop_s: float = STOP_S) -> Iterator[subprocess.Popen[bytes]]:
    """A started worker, stopped when the block ends, failed or not."""
    proc = start_worker(env, log, loglevel, cwd)
    try:
        yield proc
    finally:
        stop_worker(proc, stop_s)


def check_alive(proc: subprocess.Popen[bytes], log: Path | None, name: str = "worker") -> None:
    """RuntimeError once the process has exited, with the end of its log."""
    if proc.poll() is None:
        return
    if log is None:
        raise RuntimeError(f"the {name} exited with code {proc.returncode} (its log is above)")
    tail = log.read_text(errors="replace")[-_LOG_TAIL:]
    raise RuntimeError(f"the {name} exited with code {proc.returncode}; its log ({log}) ends: {tail}")


def wait_ready(client: Client, proc: subprocess.Popen[bytes], log: Path | None, timeout: float) -> None:
    """Ready means: the worker has loaded the model and served a job end to end (a
    warm-up job, done). RuntimeError if it exits first, TimeoutError after `timeout`."""
    job = client.submit({"text": "warm up", "job_id": "warmup-" + uuid.uuid4().hex})
    deadline = time.monotonic() + timeout
    while not client.status(job).done:
        check_alive(proc, log)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker served no job within {timeout:.0f} s")
        time.sleep(0.2)

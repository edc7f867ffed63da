"""`ttspool run`: the whole pipeline on one machine, for a first look.

Starts a throwaway Redis when no broker is configured, runs one worker process,
submits the example jobs (or a JSONL file of jobs), waits, and prints where the WAVs
are. Everything it started is stopped before it returns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .local_redis import LocalRedis
from .producer import Client, JobStatus
from .settings import Settings

EXAMPLES = Path(__file__).parent / "examples" / "jobs.jsonl"


def load_jobs(path: Path) -> list[dict[str, Any]]:
    jobs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                jobs.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
    return jobs


def _wait(client: Client, ids: list[str], worker: subprocess.Popen[bytes], timeout: float) -> list[JobStatus]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    done: dict[str, JobStatus] = {}
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as progress:
        bar = progress.add_task("synthesizing", total=len(ids))
        while len(done) < len(ids):
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode} (its log is above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids) - len(done)} job(s) unfinished after {timeout:.0f} s")
            for jid in ids:
                if jid not in done:
                    st = client.status(jid)
                    if st.done:
                        done[jid] = st
            progress.update(bar, completed=len(done))
            time.sleep(0.25)
    return [done[j] for j in ids]


def run_local(settings: Settings, jobs_file: Path | None, out_dir: Path, timeout: float) -> int:
    jobs = load_jobs(jobs_file or EXAMPLES)
    redis_server = None
    env = dict(os.environ)
    if not os.environ.get("TTSPOOL_BROKER_URL"):
        redis_server = LocalRedis().start()
        settings = settings.override(broker_url=redis_server.url)
        print(f"started a local Redis on {redis_server.url}", file=sys.stderr)
    if not os.environ.get("TTSPOOL_STORAGE_URL"):
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = settings.override(storage_url=out_dir.resolve().as_uri())
    env.update({
        "TTSPOOL_BROKER_URL": settings.broker_url,
        "TTSPOOL_STORAGE_URL": settings.storage_url,
        "TTSPOOL_MODEL": settings.model,
        "TTSPOOL_DEVICE": settings.device,
        "TTSPOOL_DTYPE": settings.dtype,
        "TTSPOOL_MAX_BATCH": str(settings.max_batch),
        "TTSPOOL_MAX_WAIT_MS": str(settings.max_wait_ms),
    })
    if settings.result_backend:
        env["TTSPOOL_RESULT_BACKEND"] = settings.result_backend
    if settings.model_dir:
        env["TTSPOOL_MODEL_DIR"] = settings.model_dir
    # A one-off local run serves no metrics unless asked: port 9808 may be a real worker's.
    env.setdefault("TTSPOOL_METRICS_PORT", "0")
    worker = subprocess.Popen([sys.executable, "-m", "tasks.cli", "worker", "--loglevel", "WARNING"], env=env)
    client = Client(settings)
    try:
        ids = client.submit_many(jobs)
        results = _wait(client, ids, worker, timeout)
    finally:
        client.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if redis_server is not None:
            redis_server.close()
    failed = 0
    for st in results:
        if st.status == "SUCCESS":
            print(f"{st.id}: {st.duration_s:.2f} s  {st.url}")
        else:
            failed += 1
            print(f"{st.id}: {st.status}  {st.error}")
    if settings.storage_url.startswith("file://"):
        print(f"WAV files are under {settings.storage_url.removeprefix('file://')}")
    return 1 if failed else 0

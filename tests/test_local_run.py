"""The README's main job: `ttspool run` starts its own Redis and worker, leaves WAVs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from tasks.cli.local_run import EXAMPLES, load_jobs


def test_run_synthesizes_the_examples_into_a_local_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env["TTSPOOL_CACHE_DIR"] = os.environ.get("TTSPOOL_CACHE_DIR", str(Path.home() / ".cache" / "ttspool"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "run", "--model", "random-tiny", "--device", "cpu", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    wavs = sorted(out.rglob("*.wav"))
    assert len(wavs) == len(load_jobs(EXAMPLES))
    for wav in wavs:
        info = sf.info(str(wav))
        assert info.samplerate == 24000 and info.channels == 1 and info.frames > 0
        assert wav.as_uri() in proc.stdout  # every output path is printed
    assert f"WAV files are under {out}" in proc.stdout


def _run(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env["TTSPOOL_CACHE_DIR"] = os.environ.get("TTSPOOL_CACHE_DIR", str(Path.home() / ".cache" / "ttspool"))
    return subprocess.run([sys.executable, "-m", "tasks.cli", "run", "--model", "random-tiny", "--device", "cpu",
                           "--out", str(tmp_path / "out"), *flags],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_run_flags_reach_its_worker(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    jobs = tmp_path / "one.jsonl"
    jobs.write_text('{"text": "Hello.", "job_id": "flag-1", "max_tokens": 8}\n')
    proc = _run(tmp_path, "--storage-url", elsewhere.as_uri(), "--jobs", str(jobs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(elsewhere.rglob("*.wav"))) == 1 and not (tmp_path / "out").exists()
    # --compile is refused on the CPU by the worker: proof that the flag got there.
    proc = _run(tmp_path, "--compile", "--jobs", str(jobs))
    assert proc.returncode == 1
    assert "ttspool: error: TTSPOOL_COMPILE=1 needs a CUDA device" in proc.stderr

"""The README's main job: `ttspool run` starts its own Redis and worker, leaves WAVs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from tasks.local_run import EXAMPLES, load_jobs


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

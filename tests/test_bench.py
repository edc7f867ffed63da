"""`ttspool bench` end to end on a tiny set (its numbers are checked by reading them,
never by timing assertions: this machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_bench_writes_table_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "bench", "--model", "random-tiny", "--device", "cpu",
         "--jobs", "6", "--batch-sizes", "1,4", "--json-out", str(out), "--plot", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x baseline" in proc.stdout and "dropping finished rows" in proc.stdout
    result = json.loads(out.read_text())
    assert result["baseline"]["audio_s_per_s"] > 0 and result["baseline"]["ratio_to_baseline"] == 1.0
    runs = result["runs"]
    assert [(r["batch_size"], r["mode"]) for r in runs] == [(1, "drop"), (4, "drop"), (4, "refill"), (4, "keep")]
    jobs = result["jobs"]
    assert jobs["count"] == 6 and jobs["max_steps"] >= 4 * jobs["min_steps"]  # a 4x spread of lengths
    for r in [result["baseline"], *runs]:
        # Every run synthesized the same jobs: the same steps and audio.
        assert r["steps"] == jobs["total_steps"]
        assert abs(r["audio_s"] - result["baseline"]["audio_s"]) < 0.05 * r["audio_s"]
        assert r["peak_rss_bytes"] > 0 and r["rtf"] > 0
        assert abs(r["ratio_to_baseline"] - r["audio_s_per_s"] / result["baseline"]["audio_s_per_s"]) < 0.01
    assert result["machine"]["device"] == "cpu" and result["drop_finished_vs_keep"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_batch_sizes() -> None:
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "bench", "--batch-sizes", "0,x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--batch-sizes" in proc.stderr


def test_bench_frontend_reports_time_per_job_and_share_of_a_batch(tmp_path: Path) -> None:
    out = tmp_path / "frontend.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "bench", "--frontend", "--model", "random-tiny", "--device", "cpu",
         "--batch-sizes", "4", "--row-steps", "16", "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "of the batch" in proc.stdout and "median ms" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["languages"]) == {"en", "zh", "mixed"}
    for r in result["languages"].values():
        assert r["texts"] == 300 and 150 <= r["mean_chars"] <= 200 and 0 < r["median_ms"] <= r["p99_ms"]
    batch = result["batch"]
    assert batch["rows"] == 4 and batch["row_steps_cap"] == 16 and batch["steps"] == 4 * 16
    assert 0 < batch["frontend_share"] < 1
    share = batch["frontend_s"] / (batch["frontend_s"] + batch["batch_s"])  # both rounded in the JSON
    assert abs(batch["frontend_share"] - share) <= 0.01 * share + 1e-4

"""`ttspool bench` end to end on a tiny set (its numbers are checked by reading them,
never by timing assertions: this machine is shared)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

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


def test_bench_chart_names_the_dtypes_two_decimals_and_real_time() -> None:
    import matplotlib.pyplot as plt

    from workers.bench.engine_bench import chart

    def run(batch_size: int, mode: str, dtype: str, audio_s_per_s: float, ratio: float) -> dict[str, object]:
        return {"batch_size": batch_size, "mode": mode, "dtype": dtype, "audio_s_per_s": audio_s_per_s,
                "ratio_to_baseline": ratio}

    # The numbers: 0.895 and 0.94 both printed "0.9x", 0.4 with no word of the dtypes.
    result = {"baseline": run(1, "baseline", "float32", 0.5, 1.0),
              "runs": [run(1, "drop", "bfloat16", 0.2, 0.4), run(4, "drop", "bfloat16", 0.4475, 0.895),
                       run(4, "refill", "bfloat16", 0.47, 0.94), run(4, "keep", "bfloat16", 0.3, 0.6)],
              "jobs": {"count": 6}, "machine": {"model": "random-tiny", "device": "cpu", "dtype": "bfloat16"}}
    fig = chart(result)
    try:
        ax = fig.axes[0]
        assert "baseline float32" in ax.get_title() and "ttspool bfloat16" in ax.get_title()
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "Chat.infer per job, float32" in legend
        assert all(t.endswith("bfloat16") for t in legend if t.startswith("ttspool"))
        assert [t.get_text() for t in ax.texts] == ["1.00x", "0.40x", "0.90x", "0.94x", "0.60x"]
        real_time = [line for line in ax.get_lines() if line.get_label() == "real time (1 audio s/s)"]
        assert len(real_time) == 1 and set(real_time[0].get_ydata()) == {1.0}
        assert ax.get_ylim()[1] > 1.0  # in view although every run is slower than real time
    finally:
        plt.close(fig)


def test_bench_model_defaults_to_the_settings(tmp_path: Path) -> None:
    # No --model: TTSPOOL_MODEL is the one loaded (here a folder with no model in it).
    missing = tmp_path / "no-model"
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "bench", "--device", "cpu", "--jobs", "2",
                           "--batch-sizes", "1"], cwd=ROOT, env={**os.environ, "TTSPOOL_MODEL": str(missing)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"{missing} is not a ChatTTS asset folder" in proc.stderr


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


@contextmanager
def _echo_server() -> Iterator[tuple[str, int]]:
    """A loopback TCP echo server: one thread per connection, stopped at the end."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(10)
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for t in threads:
            t.join(5)


def _round_trip(sock: socket.socket, payload: bytes) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the connection"
        got += chunk
    return got, time.perf_counter() - t0


def test_delay_proxy_delays_each_round_trip_and_keeps_the_bytes() -> None:
    from workers.bench.tcp_proxy import TcpProxy

    rng = random.Random(7)
    with _echo_server() as target:
        proxy = TcpProxy(target, delay_ms=80).start()
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                for size in (1, 1000, 3 * 2**20):  # the last one crosses many reads in each direction
                    payload = rng.randbytes(size)
                    got, took = _round_trip(sock, payload)
                    assert got == payload  # intact and in order
                    assert took >= 0.08
                proxy.delay_ms = 300  # settable while the connection is open
                got, took = _round_trip(sock, b"slower")
                assert got == b"slower" and took >= 0.3
            assert proxy.connections == 1
        finally:
            proxy.close()
        assert proxy.alive_threads() == []


def _dropped(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_tcp_proxy_cuts_drops_once_and_reopens_on_its_port() -> None:
    from workers.bench.tcp_proxy import TcpProxy

    with _echo_server() as target:
        proxy = TcpProxy(target).start()
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                assert _round_trip(sock, b"before")[0] == b"before"
                proxy.cut()
                assert _dropped(sock)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10).close()
            proxy.start()
            proxy.drop_at(lambda data: b"drop" in data, outage_s=1.0)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                assert _round_trip(sock, b"kept")[0] == b"kept"
                sock.sendall(b"drop here")
                assert _dropped(sock)
            assert proxy.dropped.is_set()
            with pytest.raises(ConnectionRefusedError):  # the outage
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10).close()
            deadline = time.monotonic() + 30
            while True:
                try:
                    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the proxy did not reopen after the outage"
                    time.sleep(0.05)
            with sock:
                assert _round_trip(sock, b"drop again")[0] == b"drop again"  # one drop per drop_at()
            assert proxy.connections == 3
        finally:
            proxy.close()
        assert proxy.alive_threads() == []


def _gone(pid: int, names: tuple[str, ...]) -> bool:
    """No such process, or (the pid reused since) not one the bench started."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True
    return not any(n in cmdline for n in names)


def test_bench_pipeline_runs_the_whole_path_next_to_the_engine(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    # Its own Redis, S3 (moto) and worker: nothing of the caller's configuration but the model cache.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_") or k == "TTSPOOL_CACHE_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "bench", "--pipeline", "--model", "random-tiny", "--device", "cpu",
         "--jobs", "4", "--batch-sizes", "2", "--bulk-jobs", "3", "--rt-jobs", "2", "--storage-delay-ms", "50",
         "--timeout", "300", "--json-out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x engine" in proc.stdout and "realtime" in proc.stdout
    r = json.loads(out.read_text())
    assert (r["model"], r["device"], r["batch_size"], r["jobs"], r["s3"]) == ("random-tiny", "cpu", 2, 4, "moto")
    assert r["dtype"]
    engine = r["engine"]
    assert engine["audio_s_per_s"] > 0 and engine["realtime_jobs_s"] > 0 and engine["wall_s"] > 0
    assert engine["mode"] in ("drop", "refill") and r["worker_ready_s"] > 0
    assert [p["storage_delay_ms"] for p in r["pipeline"]] == [0, 50]
    for p in r["pipeline"]:
        assert p["jobs"] == 4 and p["wall_s"] > 0 and p["audio_s_per_s"] > 0 and p["ratio_to_engine"] > 0
        # The same jobs as the engine's, from what the worker recorded; every upload went
        # through the delay proxy (a lookup and an upload per job at least).
        assert abs(p["audio_s"] - engine["audio_s"]) <= 0.05 * engine["audio_s"]
        assert p["storage_round_trips"] >= 2 * p["jobs"]
    lat = r["latency"]
    assert lat["storage_delay_ms"] == 50
    for name, n in (("realtime", 2), ("bulk", 3)):
        assert lat[name]["jobs"] == n and 0 < lat[name]["p50_s"] <= lat[name]["p99_s"] <= lat[name]["max_s"]
    assert lat["realtime_p50_vs_engine"] > 0 and lat["realtime_submitted_after_s"] > 0
    assert set(r["pids"]) == {"redis", "worker"}
    for name, pid in r["pids"].items():
        assert _gone(pid, ("redis-server", "tasks.cli worker")), f"the bench left its {name} (pid {pid}) running"


def test_bench_pipeline_without_moto_or_an_endpoint_says_what_it_needs() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    # moto unimportable, as in an install without the test extra.
    code = ("import sys; sys.modules['moto'] = None; sys.modules['moto.server'] = None\n"
            "from tasks.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--pipeline", "--model", "random-tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "test extra" in proc.stderr and "TTSPOOL_S3_ENDPOINT_URL" in proc.stderr


def test_bench_soak_reads_idle_rss_after_each_drain(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    # Its own Redis, S3 (moto) and worker, as --pipeline: nothing of the caller's configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_") or k == "TTSPOOL_CACHE_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "bench", "--soak", "--model", "random-tiny", "--device", "cpu",
         "--soak-jobs", "12", "--soak-drain-every", "4", "--soak-window", "4", "--timeout", "300",
         "--json-out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the worker's RSS when idle" in proc.stderr and "KB per job" in proc.stderr
    r = json.loads(out.read_text())
    assert (r["jobs"], r["window"], r["drain_every"], r["failed"], r["model"]) == (12, 4, 4, 0, "random-tiny")
    assert [d["jobs"] for d in r["idle_rss_mb"]] == [4, 8, 12] and all(d["mb"] > 0 for d in r["idle_rss_mb"])
    assert r["jobs_per_s"] > 0 and 0 < r["latency_p50_s"] <= r["latency_p99_s"] and r["rss_mb_at_start"] > 0


def test_soak_slope_is_the_least_squares_growth() -> None:
    from workers.bench.soak import slope

    assert slope([(0, 5.0), (10, 25.0), (20, 45.0)]) == 2.0
    assert slope([(0, 1.0)]) == 0.0 and slope([]) == 0.0

"""HTTP mirror fetches against a local Range-capable server that injects real faults:
dropped connections, stalls, 503s, an ignored Range header, corrupted bytes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from storage.models.fetch_http import FetchError, HttpPolicy
from storage.models.cache import fetch_model
from workers.bench.range_server import RangeServer
from tests.model_mirror import assert_verified, mirror, tiny_export  # noqa: F401 (fixtures)
from workers.metrics import Metrics

# Short timeouts and backoff: the faults are real, the waits need not be long.
POLICY = HttpPolicy(backoff_s=0.01, backoff_max_s=0.05, read_timeout_s=1.0, attempts=4)
RANGED = "asset/Decoder.safetensors"  # 97 MiB: parallel ranges
SINGLE = "asset/Embed.safetensors"  # 12 MiB: one stream


def _fetch(server: RangeServer, tmp_path: Path, **kw: object) -> Path:
    return fetch_model(server.url, tmp_path / "cache", policy=POLICY, tty=False, **kw)  # type: ignore[arg-type]


def _range_requests(server: RangeServer, path: str) -> list[str | None]:
    return [r for p, r in server.requests if p == path]


@pytest.mark.parametrize("rel", [RANGED, SINGLE])
def test_dropped_connection_mid_body_resumes_the_range(mirror: RangeServer, tiny_export: Path,
                                                       tmp_path: Path, rel: str) -> None:
    # "ok": the Range probe goes through; the first data request is cut halfway.
    mirror.faults[rel] += ["ok", "drop"]
    assert_verified(_fetch(mirror, tmp_path), tiny_export)
    size = (tiny_export / rel).stat().st_size
    # The retry asked only for what was missing, not for the whole range again.
    assert mirror.bytes_sent[rel] < size * 1.5
    starts = [int(m[1]) for r in _range_requests(mirror, rel) if r and (m := re.match(r"bytes=(\d+)-", r))]
    assert len(starts) > (2 if rel == RANGED else 1) and not mirror.faults[rel]


def test_stalled_connection_times_out_and_retries(mirror: RangeServer, tiny_export: Path, tmp_path: Path) -> None:
    mirror.faults[SINGLE] += ["ok", "stall"]
    assert_verified(_fetch(mirror, tmp_path), tiny_export)
    assert len(_range_requests(mirror, SINGLE)) == 3  # probe, stalled stream, resumed stream


def test_503_then_success(mirror: RangeServer, tiny_export: Path, tmp_path: Path) -> None:
    mirror.faults[RANGED] += ["503", "503", "ok", "503"]
    mirror.faults["manifest.json"] += ["503"]
    assert_verified(_fetch(mirror, tmp_path), tiny_export)
    assert mirror.hits("manifest.json") == 2 and not mirror.faults[RANGED]


def test_503_past_the_retry_budget_is_a_clear_error(mirror: RangeServer, tmp_path: Path) -> None:
    mirror.faults[SINGLE] += ["503"] * 10
    with pytest.raises(FetchError, match=r"Embed\.safetensors: giving up after 4 attempts \(HTTP 503\)"):
        _fetch(mirror, tmp_path)


def test_range_ignored_falls_back_to_one_stream(mirror: RangeServer, tiny_export: Path, tmp_path: Path) -> None:
    mirror.faults[RANGED] += ["norange"] * 20
    assert_verified(_fetch(mirror, tmp_path), tiny_export)
    # The probe answered 200, so the file came in one plain GET (the probe's body unread).
    assert _range_requests(mirror, RANGED) == ["bytes=0-0", None]


def test_corrupted_bytes_are_refetched(mirror: RangeServer, tiny_export: Path, tmp_path: Path) -> None:
    mirror.faults[RANGED] += ["ok", "corrupt"]
    assert_verified(_fetch(mirror, tmp_path), tiny_export)
    assert mirror.bytes_sent[RANGED] >= 2 * (tiny_export / RANGED).stat().st_size


def test_corruption_on_every_attempt_names_the_file(mirror: RangeServer, tmp_path: Path) -> None:
    mirror.faults[SINGLE] += ["ok", "corrupt"] * 3
    with pytest.raises(FetchError, match=r"asset/Embed\.safetensors from .*: sha256 mismatch on all 2 attempts"):
        _fetch(mirror, tmp_path, attempts=2)
    cached = tmp_path / "cache" / "models" / "random-tiny" / "main"
    assert not (cached / SINGLE).exists() and not list(cached.rglob("*.partial*"))


def test_missing_file_is_not_retried(tiny_export: Path, tmp_path: Path) -> None:
    served = tmp_path / "mirror"
    served.mkdir()
    (served / "manifest.json").write_bytes((tiny_export / "manifest.json").read_bytes())
    with RangeServer(served) as server, pytest.raises(FetchError, match=r"DVAE\.safetensors: HTTP 404"):
        _fetch(server, tmp_path)
    assert server.hits("asset/DVAE.safetensors") == 1


def test_bytes_are_counted_by_source(mirror: RangeServer, tiny_export: Path, tmp_path: Path) -> None:
    registry = Metrics().registry  # the worker's: what its /metrics serves
    before = registry.get_sample_value("ttspool_model_fetch_bytes_total", {"source": "http"}) or 0.0
    _fetch(mirror, tmp_path)
    total = sum(p.stat().st_size for p in tiny_export.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert registry.get_sample_value("ttspool_model_fetch_bytes_total", {"source": "http"}) - before == total

"""Settings: the one reader of TTSPOOL_* variables, and what it hands to child processes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks.settings import ENV_NAMES, Settings

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("tasks", "scheduler", "storage", "workers")


def test_to_env_round_trips_every_setting() -> None:
    env = {
        "TTSPOOL_BROKER_URL": "redis://127.0.0.1:7000/2", "TTSPOOL_RESULT_BACKEND": "redis://127.0.0.1:7001/0",
        "TTSPOOL_REDIS_MASTER_NAME": "ttspool-primary",
        "TTSPOOL_STORAGE_URL": "s3://bucket/prefix", "TTSPOOL_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "TTSPOOL_MODEL": "random-full", "TTSPOOL_MODEL_DIR": "/models/chattts", "TTSPOOL_DEVICE": "cuda:1",
        "TTSPOOL_DTYPE": "bfloat16", "TTSPOOL_QUANT": "int8", "TTSPOOL_COMPILE": "1", "TTSPOOL_TASK_EVENTS": "0", "TTSPOOL_MAX_BATCH": "32",
        "TTSPOOL_MAX_WAIT_MS": "250", "TTSPOOL_AGING_MS": "5000", "TTSPOOL_VISIBILITY_TIMEOUT": "7200",
        "TTSPOOL_MAX_STRIKES": "5", "TTSPOOL_UPLOAD_RETRY_S": "30", "TTSPOOL_REFILL": "0", "TTSPOOL_REALTIME_ROWS": "4",
        "TTSPOOL_STORE_THREADS": "8", "TTSPOOL_RESULT_TTL": "7200", "TTSPOOL_METRICS_PORT": "9100",
        "TTSPOOL_METRICS_ADDR": "127.0.0.1", "TTSPOOL_CACHE_DIR": "/cache", "TTSPOOL_MODEL_SOURCE": "s3://m/p",
        "TTSPOOL_MODEL_REVISION": "v2", "TTSPOOL_MODEL_PUBKEY": "/keys/pub.pem", "TTSPOOL_S3_SSE": "aws:kms",
        "TTSPOOL_RATE_LIMITS": "acme=10/s", "TTSPOOL_FAULT_OOM_ABOVE": "4",
        "TTSPOOL_LEXICON": "/etc/ttspool/lexicon.tsv", "TTSPOOL_DATE_ORDER": "dmy", "TTSPOOL_PHONE_YAO": "1",
        "TTSPOOL_HTTP_HOST": "0.0.0.0", "TTSPOOL_HTTP_PORT": "8080", "TTSPOOL_API_KEYS": "acme=k1,beta=k2",
        "TTSPOOL_ADMIN_KEYS": "ops=k3",
        "TTSPOOL_HTTP_MAX_BODY": "65536", "TTSPOOL_VOICE_CACHE_S": "2",
        "TTSPOOL_HTTP_HEADER_TIMEOUT": "5", "TTSPOOL_HTTP_BODY_TIMEOUT": "20", "TTSPOOL_HTTP_KEEPALIVE_TIMEOUT": "3",
        "TTSPOOL_HTTP_MAX_CONNECTIONS": "500", "TTSPOOL_HTTP_STORAGE_TIMEOUT": "4",
        "TTSPOOL_HTTP_STORAGE_ATTEMPTS": "3", "TTSPOOL_HTTP_STORAGE_THREADS": "8",
    }
    # Every setting has a variable, and this test sets every one of them.
    assert set(env) - {"TTSPOOL_FAULT_OOM_ABOVE"} == set(ENV_NAMES.values())
    s = Settings.from_env(env)
    assert s.to_env() == env
    assert Settings.from_env(s.to_env()) == s
    assert s.explicit == set(ENV_NAMES)


def test_flags_count_as_explicit_and_defaults_do_not() -> None:
    s = Settings.from_env({"TTSPOOL_MODEL": "random-tiny"})
    assert s.explicit == {"model"}
    assert s.override(storage_url="file:///tmp/x", device=None).explicit == {"model", "storage_url"}


def test_max_deliveries_is_a_deprecated_name_for_max_strikes(caplog: pytest.LogCaptureFixture) -> None:
    assert Settings.from_env({"TTSPOOL_MAX_DELIVERIES": "7"}).max_strikes == 7
    assert "TTSPOOL_MAX_DELIVERIES is deprecated" in caplog.text
    assert Settings.from_env({"TTSPOOL_MAX_DELIVERIES": "7", "TTSPOOL_MAX_STRIKES": "2"}).max_strikes == 2


def test_only_settings_reads_the_environment() -> None:
    """os.environ / os.getenv appear in tasks/settings.py only (HF_ENDPOINT, which
    huggingface_hub itself reads, is the one exception, in the hub source)."""
    readers = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                name = (node.attr if isinstance(node, ast.Attribute) else None)
                if name in ("environ", "getenv") and isinstance(node.value, ast.Name) and node.value.id == "os":
                    readers.append(rel)
    allowed = {"tasks/settings.py", "storage/models/sources.py", "tasks/cli/local_run.py"}
    assert set(readers) <= allowed, sorted(set(readers) - allowed)


def test_sentinel_urls_name_their_sentinels_and_the_primary() -> None:
    from tasks.broker_redis import sentinel_hosts
    from tasks.errors import SettingsError

    url = "sentinel://:s%40cret@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://sentinel-3"
    assert Settings.from_env({"TTSPOOL_BROKER_URL": url}).broker_url == url
    assert sentinel_hosts(url) == ([("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)],
                                   {"db": 2, "password": "s@cret"})
    for bad in ("sentinel://", "sentinel://h1:26379;redis://h2:6379", "sentinel://h1:port"):
        with pytest.raises(SettingsError, match="sentinel://") as err:
            Settings.from_env({"TTSPOOL_BROKER_URL": bad})
        assert "s@cret" not in str(err.value)

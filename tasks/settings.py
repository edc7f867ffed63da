"""Configuration from the environment (TTSPOOL_*); CLI flags override field by field."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import SettingsError

log = logging.getLogger(__name__)

QUEUE_REALTIME = "tts.realtime"
QUEUE_BULK = "tts.bulk"
QUEUES = (QUEUE_REALTIME, QUEUE_BULK)
TASK_NAME = "ttspool.synthesize"
# Jobs that crashed or hung the worker too often: JSON {id, kwargs, reason, at}, newest first.
DEAD_LETTER_KEY = "ttspool:dead"
# Book assembly (a plain task, not a GPU batch); polled before tts.bulk so that a
# finished book is not held back behind every other book's segments.
QUEUE_ASSEMBLE = "tts.assemble"
ASSEMBLE_TASK = "ttspool.assemble_book"
WORKER_QUEUES = (QUEUE_REALTIME, QUEUE_ASSEMBLE, QUEUE_BULK)

_MODELS = ("chattts", "random-tiny", "random-full")
SSE_VALUES = frozenset({"AES256", "aws:kms", "aws:kms:dsse"})


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = (env.get(name) or ("1" if default else "0")).strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{name} must be 0 or 1, got {raw!r}")
    return raw in ("1", "true", "yes")


@dataclass(frozen=True)
class Settings:
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    # The primary's name in Sentinel's config, for sentinel:// broker and backend URLs.
    redis_master_name: str = "mymaster"
    storage_url: str = field(default_factory=lambda: Path("out").resolve().as_uri())
    s3_endpoint_url: str | None = None
    model: str = "chattts"
    model_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # Weight-only int8 for the GPT's linears (CPU, bfloat16): faster at one or two rows.
    quant: str = "none"
    compile: bool = False  # torch.compile the GPT (TTSPOOL_COMPILE=1)
    # Celery task events for every job (Flower, celery-exporter): a few small pub/sub
    # messages per job, published in batches; nothing kept in Redis.
    task_events: bool = True
    max_batch: int = 16
    max_wait_ms: int = 100
    # A bulk job held this long ranks with realtime ones, so bulk is never starved.
    aging_ms: int = 10_000
    # Must exceed buffering + one batch + upload, or Redis hands a running job to a
    # second worker. Kept in seconds, as Redis' transport option is.
    visibility_timeout: int = 3600
    # GPU batches a job may be in that never returned (the worker died or hung) before it
    # is failed and dead-lettered. Not deliveries: a storage outage or a Redis restart
    # re-delivers jobs without their being to blame.
    max_strikes: int = 3
    # How long a failed upload is retried in place (growing pauses, on top of boto3's
    # own retries) before the job goes back to the queue; a graceful stop may wait this.
    upload_retry_s: int = 60
    # Iteration-level batching: rows that end are refilled from held jobs while the batch
    # runs (the planner picks them). Measured in docs/PERF.md.
    refill: bool = True
    # Rows past max_batch that only realtime jobs may take in a running batch (with
    # refill): one joins a batch full of bulk rows at its next step. 0: none.
    realtime_rows: int = 2
    # Threads that encode, upload and record finished rows while the GPU runs on.
    store_threads: int = 4
    # Seconds the broker's Redis keeps a finished job's result and its id's claim;
    # afterwards its status is read from its durable record in storage
    # (docs/RELIABILITY.md, retention).
    result_ttl: int = 6 * 3600
    # Worker /metrics and /healthz; 0 turns the HTTP server off. All interfaces by
    # default so Prometheus and the kubelet can reach it inside a container.
    metrics_port: int = 9808
    metrics_addr: str = "0.0.0.0"
    # The node's model cache and where a missing model is fetched from (docs/MODELS.md).
    cache_dir: str = field(default_factory=lambda: str(Path.home() / ".cache" / "ttspool"))
    model_source: str | None = None  # None: hf for chattts; random models built here
    model_revision: str | None = None
    model_pubkey: str | None = None
    s3_sse: str | None = None  # server-side encryption: AES256, aws:kms, aws:kms:dsse
    # Producer-side per-tenant limits, e.g. "acme=10/s:burst=20,*=5/s" (tasks/ratelimit.py).
    rate_limits: str = ""
    # The text front-end (docs/TEXT.md): a pronunciation lexicon file (written<TAB>spoken),
    # the order of ambiguous numeric dates (mdy, dmy or ymd), and 幺 for 1 in Chinese
    # phone numbers and codes.
    lexicon: str | None = None
    date_order: str = "mdy"
    phone_yao: bool = False
    # `ttspool serve` (tasks/gateway): where it listens, its API keys (tenant=key pairs,
    # comma separated; none: loopback only) and the largest request body it reads.
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    api_keys: str = field(default="", repr=False)  # secrets: never in a repr or a log
    # Operators' keys (name=key pairs): the gateway's voice routes manage the shared voices
    # with one, or a tenant's (tasks/gateway/routes_voices.py).
    admin_keys: str = field(default="", repr=False)
    http_max_body: int = 1 << 20
    # The gateway's server limits (tasks/gateway/server.py, limits.py): seconds for a
    # request's headers to arrive once it starts, for its body once the headers are in,
    # for a kept-alive (or new) connection to start a request; and open connections
    # (past it, new requests get 503).
    http_header_timeout: int = 10
    http_body_timeout: int = 30
    http_keepalive_timeout: int = 5
    http_max_connections: int = 1000
    # The gateway's storage calls: seconds to connect and to wait for each read, boto3
    # attempts, and threads of their own (a stalled store fills these, not the threads
    # the Redis calls run on). attempts x (connect + read) stays under a client's 60 s.
    http_storage_timeout: int = 10
    http_storage_attempts: int = 2
    http_storage_threads: int = 16
    # How long a worker keeps a library voice before reading it again (tasks/voices.py):
    # the longest a replaced voice is still used after the change.
    voice_cache_s: int = 5
    # Test hooks (workers/faults.py): TTSPOOL_FAULT_<NAME> variables, as (NAME, value).
    faults: tuple[tuple[str, str], ...] = ()
    # Fields set explicitly (environment or flag), as opposed to defaults: `ttspool run`
    # starts a throwaway Redis and a local output folder only for what nobody configured.
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

    @property
    def model_pubkey_path(self) -> Path | None:
        return Path(self.model_pubkey).expanduser() if self.model_pubkey else None

    def override(self, **changes: Any) -> "Settings":
        given = {k: v for k, v in changes.items() if v is not None}
        return validate(replace(self, **given, explicit=self.explicit | frozenset(given)))

    def to_env(self) -> dict[str, str]:
        """The TTSPOOL_* variables that make Settings.from_env() give these settings back
        (for a child process, e.g. the worker `ttspool run` starts)."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "faults":
                env.update({f"{_FAULT_PREFIX}{k}": v for k, v in value})
            elif f.name in ENV_NAMES and value is not None:
                env[ENV_NAMES[f.name]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()
        strikes_var = "TTSPOOL_MAX_STRIKES"
        if not env.get(strikes_var) and env.get("TTSPOOL_MAX_DELIVERIES"):
            log.warning("TTSPOOL_MAX_DELIVERIES is deprecated: it counts strikes; set TTSPOOL_MAX_STRIKES")
            strikes_var = "TTSPOOL_MAX_DELIVERIES"
        explicit = frozenset(name for name, var in ENV_NAMES.items() if env.get(var))
        if strikes_var != "TTSPOOL_MAX_STRIKES":
            explicit |= {"max_strikes"}
        return validate(
            cls(
                broker_url=env.get("TTSPOOL_BROKER_URL") or d.broker_url,
                result_backend=env.get("TTSPOOL_RESULT_BACKEND") or None,
                redis_master_name=env.get("TTSPOOL_REDIS_MASTER_NAME") or d.redis_master_name,
                storage_url=env.get("TTSPOOL_STORAGE_URL") or d.storage_url,
                s3_endpoint_url=env.get("TTSPOOL_S3_ENDPOINT_URL") or None,
                model=env.get("TTSPOOL_MODEL") or d.model,
                model_dir=env.get("TTSPOOL_MODEL_DIR") or None,
                device=env.get("TTSPOOL_DEVICE") or d.device,
                dtype=env.get("TTSPOOL_DTYPE") or d.dtype,
                quant=env.get("TTSPOOL_QUANT") or d.quant,
                compile=_bool(env, "TTSPOOL_COMPILE"),
                task_events=_bool(env, "TTSPOOL_TASK_EVENTS", d.task_events),
                max_batch=_int(env, "TTSPOOL_MAX_BATCH", d.max_batch, 1, 256),
                max_wait_ms=_int(env, "TTSPOOL_MAX_WAIT_MS", d.max_wait_ms, 0, 60_000),
                aging_ms=_int(env, "TTSPOOL_AGING_MS", d.aging_ms, 0, 3_600_000),
                visibility_timeout=_int(
                    env, "TTSPOOL_VISIBILITY_TIMEOUT", d.visibility_timeout, 10, 7 * 86400
                ),
                max_strikes=_int(env, strikes_var, d.max_strikes, 1, 100),
                upload_retry_s=_int(env, "TTSPOOL_UPLOAD_RETRY_S", d.upload_retry_s, 0, 3600),
                refill=_bool(env, "TTSPOOL_REFILL", d.refill),
                realtime_rows=_int(env, "TTSPOOL_REALTIME_ROWS", d.realtime_rows, 0, 64),
                store_threads=_int(env, "TTSPOOL_STORE_THREADS", d.store_threads, 1, 64),
                result_ttl=_int(env, "TTSPOOL_RESULT_TTL", d.result_ttl, 10, 30 * 86400),
                metrics_port=_int(env, "TTSPOOL_METRICS_PORT", d.metrics_port, 0, 65535),
                metrics_addr=env.get("TTSPOOL_METRICS_ADDR") or d.metrics_addr,
                cache_dir=env.get("TTSPOOL_CACHE_DIR") or d.cache_dir,
                model_source=env.get("TTSPOOL_MODEL_SOURCE") or None,
                model_revision=env.get("TTSPOOL_MODEL_REVISION") or None,
                model_pubkey=env.get("TTSPOOL_MODEL_PUBKEY") or None,
                s3_sse=env.get("TTSPOOL_S3_SSE") or None,
                rate_limits=env.get("TTSPOOL_RATE_LIMITS") or "",
                lexicon=env.get("TTSPOOL_LEXICON") or None,
                date_order=(env.get("TTSPOOL_DATE_ORDER") or d.date_order).lower(),
                phone_yao=_bool(env, "TTSPOOL_PHONE_YAO"),
                http_host=env.get("TTSPOOL_HTTP_HOST") or d.http_host,
                http_port=_int(env, "TTSPOOL_HTTP_PORT", d.http_port, 0, 65535),
                api_keys=env.get("TTSPOOL_API_KEYS") or "",
                admin_keys=env.get("TTSPOOL_ADMIN_KEYS") or "",
                http_max_body=_int(env, "TTSPOOL_HTTP_MAX_BODY", d.http_max_body, 1024, 1 << 30),
                http_header_timeout=_int(env, "TTSPOOL_HTTP_HEADER_TIMEOUT", d.http_header_timeout, 1, 3600),
                http_body_timeout=_int(env, "TTSPOOL_HTTP_BODY_TIMEOUT", d.http_body_timeout, 1, 3600),
                http_keepalive_timeout=_int(env, "TTSPOOL_HTTP_KEEPALIVE_TIMEOUT", d.http_keepalive_timeout, 1, 3600),
                http_max_connections=_int(env, "TTSPOOL_HTTP_MAX_CONNECTIONS", d.http_max_connections, 1, 1_000_000),
                http_storage_timeout=_int(env, "TTSPOOL_HTTP_STORAGE_TIMEOUT", d.http_storage_timeout, 1, 600),
                http_storage_attempts=_int(env, "TTSPOOL_HTTP_STORAGE_ATTEMPTS", d.http_storage_attempts, 1, 10),
                http_storage_threads=_int(env, "TTSPOOL_HTTP_STORAGE_THREADS", d.http_storage_threads, 1, 1024),
                voice_cache_s=_int(env, "TTSPOOL_VOICE_CACHE_S", d.voice_cache_s, 0, 3600),
                faults=tuple(sorted((k.removeprefix(_FAULT_PREFIX), v) for k, v in env.items()
                                    if k.startswith(_FAULT_PREFIX) and v)),
                explicit=explicit,
            )
        )


_FAULT_PREFIX = "TTSPOOL_FAULT_"
# Every setting's variable. `faults` (a family of variables) and `explicit` have none.
ENV_NAMES = {
    "broker_url": "TTSPOOL_BROKER_URL", "result_backend": "TTSPOOL_RESULT_BACKEND",
    "redis_master_name": "TTSPOOL_REDIS_MASTER_NAME",
    "storage_url": "TTSPOOL_STORAGE_URL", "s3_endpoint_url": "TTSPOOL_S3_ENDPOINT_URL",
    "model": "TTSPOOL_MODEL", "model_dir": "TTSPOOL_MODEL_DIR", "device": "TTSPOOL_DEVICE",
    "dtype": "TTSPOOL_DTYPE", "quant": "TTSPOOL_QUANT", "compile": "TTSPOOL_COMPILE",
    "task_events": "TTSPOOL_TASK_EVENTS", "max_batch": "TTSPOOL_MAX_BATCH",
    "max_wait_ms": "TTSPOOL_MAX_WAIT_MS", "aging_ms": "TTSPOOL_AGING_MS",
    "visibility_timeout": "TTSPOOL_VISIBILITY_TIMEOUT", "max_strikes": "TTSPOOL_MAX_STRIKES",
    "upload_retry_s": "TTSPOOL_UPLOAD_RETRY_S", "refill": "TTSPOOL_REFILL",
    "realtime_rows": "TTSPOOL_REALTIME_ROWS", "store_threads": "TTSPOOL_STORE_THREADS",
    "result_ttl": "TTSPOOL_RESULT_TTL", "metrics_port": "TTSPOOL_METRICS_PORT",
    "metrics_addr": "TTSPOOL_METRICS_ADDR", "cache_dir": "TTSPOOL_CACHE_DIR",
    "model_source": "TTSPOOL_MODEL_SOURCE", "model_revision": "TTSPOOL_MODEL_REVISION",
    "model_pubkey": "TTSPOOL_MODEL_PUBKEY", "s3_sse": "TTSPOOL_S3_SSE", "rate_limits": "TTSPOOL_RATE_LIMITS",
    "lexicon": "TTSPOOL_LEXICON", "date_order": "TTSPOOL_DATE_ORDER", "phone_yao": "TTSPOOL_PHONE_YAO",
    "http_host": "TTSPOOL_HTTP_HOST", "http_port": "TTSPOOL_HTTP_PORT", "api_keys": "TTSPOOL_API_KEYS",
    "admin_keys": "TTSPOOL_ADMIN_KEYS", "http_max_body": "TTSPOOL_HTTP_MAX_BODY", "voice_cache_s": "TTSPOOL_VOICE_CACHE_S",
    "http_header_timeout": "TTSPOOL_HTTP_HEADER_TIMEOUT", "http_body_timeout": "TTSPOOL_HTTP_BODY_TIMEOUT",
    "http_keepalive_timeout": "TTSPOOL_HTTP_KEEPALIVE_TIMEOUT", "http_max_connections": "TTSPOOL_HTTP_MAX_CONNECTIONS",
    "http_storage_timeout": "TTSPOOL_HTTP_STORAGE_TIMEOUT", "http_storage_attempts": "TTSPOOL_HTTP_STORAGE_ATTEMPTS",
    "http_storage_threads": "TTSPOOL_HTTP_STORAGE_THREADS",
}


def validate(s: Settings) -> Settings:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s.device):
        raise SettingsError(f"TTSPOOL_DEVICE must be auto, cpu, cuda or cuda:N, got {s.device!r}")
    if s.dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise SettingsError(
            f"TTSPOOL_DTYPE must be auto, float16, bfloat16 or float32, got {s.dtype!r}"
        )
    if s.quant not in ("none", "int8"):
        raise SettingsError(f"TTSPOOL_QUANT must be none or int8, got {s.quant!r}")
    if s.model not in _MODELS and not os.path.isabs(os.path.expanduser(s.model)):
        raise SettingsError(
            f"TTSPOOL_MODEL must be one of {', '.join(_MODELS)} or an absolute path to a "
            f"ChatTTS asset folder, got {s.model!r}"
        )
    if s.date_order not in ("mdy", "dmy", "ymd"):
        raise SettingsError(f"TTSPOOL_DATE_ORDER must be mdy, dmy or ymd, got {s.date_order!r}")
    if s.s3_sse is not None and s.s3_sse not in SSE_VALUES:
        raise SettingsError(f"TTSPOOL_S3_SSE must be one of {sorted(SSE_VALUES)}, got {s.s3_sse!r}")
    for name, url in (("TTSPOOL_BROKER_URL", s.broker_url), ("TTSPOOL_RESULT_BACKEND", s.backend_url)):
        if url.startswith("sentinel://"):
            if not re.fullmatch(r"sentinel://([^/@;]*@)?[^/@;:]+(:\d+)?(/\d*)?(;sentinel://[^/@;:]+(:\d+)?(/\d*)?)*;?", url):
                raise SettingsError(f"{name} must list its sentinels as sentinel://[:password@]host:port[/db];"
                                    f"sentinel://host:port;..., got {redact_url(url)!r}")
            continue
        if not re.match(r"rediss?://", url):
            raise SettingsError(f"{name} must be a redis://, rediss:// or sentinel:// URL, got {redact_url(url)!r}")
        # Without it kombu would connect with TLS but without checking the certificate.
        if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
            raise SettingsError(
                f"{name} is a rediss:// URL without ?ssl_cert_reqs=required (with "
                f"&ssl_ca_certs=/path/ca.pem for a private CA): {redact_url(url)!r}"
            )
    return s


def redact_url(url: str) -> str:
    """Hide credentials before logging or erroring: the password of scheme://user:password@host,
    and a bare scheme://token@host (a user name alone may be a secret, e.g. an API token)."""
    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m[2].partition(":")
        return f"{m[1]}{user}:***@" if colon else f"{m[1]}***@"

    return re.sub(r"(://)([^/@]*)@", hide, url)

"""What several verb groups share: argument types, engine flags, status printing."""

from __future__ import annotations

import argparse
import json
from typing import Any

# The fix for a Redis that cannot be reached: the CLI's error line and `doctor` say it.
REDIS_FIX = ("run `ttspool up` (a local pool with its own Redis) and export the TTSPOOL_BROKER_URL it prints, "
             "start Redis there (redis-server, or `docker compose -f deploy/compose.yaml up -d redis`), "
             "or point TTSPOOL_BROKER_URL (or --broker-url) at a running one")


def voice_arg(raw: str) -> int | str:
    return int(raw) if raw.isdigit() else raw


def producer(settings: Any) -> Any:
    """A producer Client that checks voice names against the store as well as the index."""
    from storage import storage_for

    from ..producer import Client

    return Client(settings, storage=storage_for(settings))


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="chattts | random-tiny | random-full | /path/to/assets (TTSPOOL_MODEL)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (TTSPOOL_DEVICE)")
    p.add_argument("--dtype", help="auto | float16 | bfloat16 | float32 (TTSPOOL_DTYPE)")
    p.add_argument("--quant", help="none | int8: weight-only int8 GPT linears, CPU and bfloat16 only (TTSPOOL_QUANT)")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the GPT (TTSPOOL_COMPILE=1)")
    p.add_argument("--max-batch", type=int, help="rows per GPU batch (TTSPOOL_MAX_BATCH)")
    p.add_argument("--max-wait-ms", type=int, help="longest wait to fill a batch (TTSPOOL_MAX_WAIT_MS)")
    p.add_argument("--storage-url", help="file:///abs/dir or s3://bucket/prefix (TTSPOOL_STORAGE_URL)")


def print_status(st: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(st.to_dict()))
    else:
        line = f"{st.id} {st.status}"
        if st.url:
            line += f" {st.duration_s:.2f}s {st.url}"
        if st.error:
            line += f" {st.error}"
        print(line)
